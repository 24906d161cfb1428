//! `autoglm kg`: load, query (table, JSON, CSV), stats, and bad input.

use std::process::Command;

fn autoglm(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_autoglm"))
        .args(args)
        .output()
        .expect("run autoglm");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn load_query_stats_and_bad_input() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let store = d.join("s.nq");
    let store = store.to_str().unwrap();
    std::fs::write(
        d.join("a.ttl"),
        "@prefix ex: <http://example.org/> .\nex:tabby ex:isa ex:cat . ex:cat ex:isa ex:feline .\nex:cat ex:name \"cat, the \\\"animal\\\"\" .\n",
    )
    .unwrap();
    std::fs::write(
        d.join("b.nt"),
        "<http://example.org/feline> <http://example.org/isa> <http://example.org/animal> .\n",
    )
    .unwrap();
    let (ok, out, err) = autoglm(&[
        "kg",
        "load",
        "--store",
        store,
        d.join("a.ttl").to_str().unwrap(),
        d.join("b.nt").to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    assert!(out.contains("4 quads"), "{out}");

    let q = "PREFIX ex: <http://example.org/> SELECT ?x WHERE { ex:tabby ex:isa+ ?x } ORDER BY ?x";
    let (ok, out, err) = autoglm(&["kg", "query", "--store", store, q]);
    assert!(ok, "{err}");
    assert_eq!(out.lines().next(), Some("?x"), "{out}");
    assert!(
        out.contains("<http://example.org/animal>") && out.contains("(3 rows)"),
        "{out}"
    );
    let (_, out, _) = autoglm(&["kg", "query", "--store", store, "--format", "json", q]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["head"]["vars"], serde_json::json!(["x"]));
    assert_eq!(
        v["results"]["bindings"][0]["x"],
        serde_json::json!({"type": "uri", "value": "http://example.org/animal"})
    );
    let (_, out, _) = autoglm(&[
        "kg",
        "query",
        "--store",
        store,
        "--format",
        "csv",
        "SELECT ?n WHERE { ?s <http://example.org/name> ?n }",
    ]);
    assert_eq!(out, "n\r\n\"cat, the \"\"animal\"\"\"\r\n");
    let (_, out, _) = autoglm(&[
        "kg",
        "query",
        "--store",
        store,
        "ASK { ?s ?p <http://example.org/animal> }",
    ]);
    assert_eq!(out.trim(), "true");
    let (ok, out, _) = autoglm(&["--json", "kg", "stats", "--store", store]);
    assert!(ok);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["quads"], 4);
    assert_eq!(v["predicates"][0]["count"], 3);

    // Bad input: a syntax error with line and column, an unknown format, a
    // bad query, SERVICE, a missing store; the store is left as it was.
    std::fs::write(
        d.join("bad.ttl"),
        "@prefix ex: <http://example.org/> .\nex:a ex:b ex:c .\nex:a ex:b .\n",
    )
    .unwrap();
    let (ok, _, err) = autoglm(&[
        "kg",
        "load",
        "--store",
        store,
        d.join("bad.ttl").to_str().unwrap(),
    ]);
    assert!(!ok && err.contains("bad.ttl:3:"), "{err}");
    std::fs::write(d.join("x.data"), "x").unwrap();
    let (ok, _, err) = autoglm(&[
        "kg",
        "load",
        "--store",
        store,
        d.join("x.data").to_str().unwrap(),
    ]);
    assert!(!ok && err.contains("unknown RDF format"), "{err}");
    let (ok, _, err) = autoglm(&["kg", "query", "--store", store, "SELECT ?x WHERE {"]);
    assert!(!ok && err.contains("SPARQL syntax"), "{err}");
    let (ok, _, err) = autoglm(&[
        "kg",
        "query",
        "--store",
        store,
        "SELECT * WHERE { SERVICE <http://dbpedia.org/sparql> { ?s ?p ?o } }",
    ]);
    assert!(!ok && err.contains("SERVICE queries are disabled"), "{err}");
    let (ok, _, err) = autoglm(&[
        "kg",
        "query",
        "--store",
        d.join("none.nq").to_str().unwrap(),
        "ASK {}",
    ]);
    assert!(!ok && err.contains("kg load"), "{err}");
    let (_, out, _) = autoglm(&["--json", "kg", "stats", "--store", store]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["quads"], 4, "failed loads change nothing");
}
