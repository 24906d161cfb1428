//! Chat template rendering against transformers' `apply_chat_template`
//! (fixtures made by tools/reference/chat_templates.py and llava_tiny.py).

mod common;

use autoglm::text::chat::ChatTemplate;
use common::fixtures;
use serde_json::Value;

#[test]
fn renders_exactly_as_transformers() {
    let f: Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("chat_templates.json")).unwrap(),
    )
    .unwrap();
    let (bos, eos) = (
        f["bos_token"].as_str().unwrap(),
        f["eos_token"].as_str().unwrap(),
    );
    let cases = f["cases"].as_array().unwrap();
    assert!(cases.len() >= 10);
    for c in cases {
        let t = ChatTemplate::new(c["template"].as_str().unwrap(), bos, eos).unwrap();
        let got = t.render(
            &c["messages"],
            c["add_generation_prompt"].as_bool().unwrap(),
        );
        match (&c["rendered"], &c["error"]) {
            (Value::String(want), _) => assert_eq!(&got.unwrap(), want, "{}", c["name"]),
            (_, Value::String(msg)) => {
                let e = got.unwrap_err().to_string();
                assert!(e.contains(msg.as_str()), "{e}");
            }
            _ => panic!("bad fixture"),
        }
    }
}

#[test]
fn model_directory_template_matches_its_reference() {
    for name in ["llava-tiny-llama", "llava-tiny-qwen2"] {
        let dir = fixtures().join(name);
        let t = ChatTemplate::load(&dir).unwrap().expect("template");
        let r: Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap())
                .unwrap();
        for (conv, want) in r["conversations"]
            .as_array()
            .unwrap()
            .iter()
            .zip(r["rendered"].as_array().unwrap())
        {
            assert_eq!(t.render(conv, true).unwrap(), want.as_str().unwrap());
        }
    }
}
