//! `autoglm serve` driven by the official `openai` Python SDK
//! (tools/server-tests/openai_suite.py; scripts/test.sh installs the SDK):
//! chat with images, streaming, embeddings, 401, 413, 400/404, a 429 under
//! a full queue, a cancelled stream, a stream that finishes after SIGTERM,
//! TLS with client certificates, and a clean exit on SIGTERM.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// A running server, killed if the test fails.
struct Server {
    child: Child,
    base: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn serve(args: &[&str], keys: &str) -> Server {
    let mut child = Command::new(env!("CARGO_BIN_EXE_autoglm"))
        .args(["serve", "--port", "0"])
        .args(args)
        .env("AUTOGLM_API_KEYS", keys)
        .env("RAYON_NUM_THREADS", "2")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start autoglm serve");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(line);
    });
    let line = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("the server announces its address within 60 s");
    let base = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("unexpected first line: {line:?}"))
        .to_string();
    Server { child, base }
}

fn sdk() -> PathBuf {
    let dir = std::env::var_os("AUTOGLM_OPENAI_SDK")
        .map(PathBuf::from)
        .unwrap_or_else(|| autoglm::io::assets::home().join("python/openai-sdk"));
    assert!(
        dir.join("openai").is_dir(),
        "the openai SDK is not installed at {}; run scripts/test.sh (it installs tools/server-tests/requirements.txt there)",
        dir.display()
    );
    dir
}

fn suite(args: &[&str]) {
    let out = Command::new("python3")
        .arg(root().join("tools/server-tests/openai_suite.py"))
        .args(args)
        .env("PYTHONPATH", sdk())
        .output()
        .expect("run python3");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    println!("{text}");
    assert!(
        out.status.success(),
        "openai suite {args:?} failed:\n{text}"
    );
}

/// Sends SIGTERM and expects a clean exit well within the grace period.
fn terminate(mut s: Server) {
    // SAFETY: sending a signal to our own child process.
    unsafe {
        libc::kill(s.child.id() as i32, libc::SIGTERM);
    }
    let t0 = Instant::now();
    loop {
        if let Some(status) = s.child.try_wait().unwrap() {
            assert!(status.success(), "exit after SIGTERM: {status}");
            return;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "no exit 10 s after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn openai_sdk_against_the_default_model() {
    let s = serve(
        &["--max-body-bytes", "2000000"],
        "sk-test-key-0001,sk-test-key-0002",
    );
    suite(&[
        "main",
        "--base",
        &s.base,
        "--key",
        "sk-test-key-0002",
        "--samples",
        root().join("assets/samples/easy-vqa").to_str().unwrap(),
        "--max-body",
        "2000000",
    ]);
    terminate(s);
}

/// The random test decoder with a long context: answers of thousands of
/// tokens keep the one-sequence batch busy.
fn slow_model(dir: &Path) {
    let src = root().join("tests/fixtures/llava-tiny-llama");
    for e in std::fs::read_dir(&src).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, dir.join(p.file_name().unwrap())).unwrap();
    }
    let cfg = std::fs::read_to_string(dir.join("config.json")).unwrap();
    let cfg = cfg.replace(
        "\"max_position_embeddings\": 256",
        "\"max_position_embeddings\": 4096",
    );
    assert!(cfg.contains("4096"));
    std::fs::write(dir.join("config.json"), cfg).unwrap();
}

#[test]
fn openai_sdk_sees_429_cancels_closed_streams_and_drains_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    slow_model(dir.path());
    let s = serve(
        &[
            "--model",
            dir.path().to_str().unwrap(),
            "--model-name",
            "slow",
            "--embedding-model",
            "none",
            "--max-batch",
            "1",
            "--queue",
            "1",
            "--allow-remote-images",
            "--shutdown-grace",
            "30",
        ],
        "sk-test-key-0003",
    );
    let metrics = format!("{}/metrics", s.base);
    let pid = s.child.id().to_string();
    suite(&[
        "busy",
        "--base",
        &s.base,
        "--key",
        "sk-test-key-0003",
        "--metrics",
        &metrics,
        "--pid",
        &pid,
        "--samples",
        root().join("assets/samples/easy-vqa").to_str().unwrap(),
    ]);
    terminate(s);
}

#[test]
fn mutual_tls_admits_only_clients_with_a_certificate_from_the_ca() {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
        KeyUsagePurpose,
    };
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let write = |name: &str, text: String| {
        let p = d.join(name);
        std::fs::write(&p, text).unwrap();
        p.to_str().unwrap().to_string()
    };
    let mut ca = CertificateParams::new(vec![]).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "autoglm test CA");
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_key = KeyPair::generate().unwrap();
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let leaf = |sans: Vec<String>, usage: ExtendedKeyUsagePurpose| {
        let mut p = CertificateParams::new(sans).unwrap();
        p.distinguished_name
            .push(DnType::CommonName, "autoglm test");
        p.extended_key_usages = vec![usage];
        let k = KeyPair::generate().unwrap();
        let c = p.signed_by(&k, &ca_cert, &ca_key).unwrap();
        (c.pem(), k.serialize_pem())
    };
    let (server_pem, server_key) = leaf(
        vec!["localhost".into(), "127.0.0.1".into()],
        ExtendedKeyUsagePurpose::ServerAuth,
    );
    let (client_pem, client_key) = leaf(vec![], ExtendedKeyUsagePurpose::ClientAuth);
    let ca_path = write("ca.pem", ca_cert.pem());
    let server_cert = write("server.pem", server_pem);
    let server_key = write("server.key", server_key);
    let client_cert = write("client.pem", client_pem);
    let client_key = write("client.key", client_key);
    let s = serve(
        &[
            "--tls-cert",
            &server_cert,
            "--tls-key",
            &server_key,
            "--tls-client-ca",
            &ca_path,
            "--embedding-model",
            "none",
        ],
        "sk-test-key-0004",
    );
    assert!(s.base.starts_with("https://"), "{}", s.base);
    suite(&[
        "mtls",
        "--base",
        &s.base,
        "--key",
        "sk-test-key-0004",
        "--ca",
        &ca_path,
        "--cert",
        &client_cert,
        "--client-key",
        &client_key,
        "--samples",
        root().join("assets/samples/easy-vqa").to_str().unwrap(),
    ]);
    terminate(s);
}

/// `--kg`: a second model, `kg-reader`, answers about a photo from WordNet
/// facts; the SDK sees the answer and the grounding beside it.
#[test]
fn openai_sdk_against_the_kg_model() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("wordnet.nq");
    let out = Command::new(env!("CARGO_BIN_EXE_autoglm"))
        .args(["kg", "import-wordnet", "--store", store.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let s = serve(&["--kg", store.to_str().unwrap()], "sk-test-key-0003");
    let photo = autoglm::io::assets::dir("photos")
        .unwrap()
        .join("chelsea.png");
    suite(&[
        "kg",
        "--base",
        &s.base,
        "--key",
        "sk-test-key-0003",
        "--photo",
        photo.to_str().unwrap(),
    ]);
    terminate(s);
}
