//! Tokenizers against llama.cpp's vocab suite (../shared/tokenizers) and chat templates
//! against Jinja2's renderings (../shared/chat-templates).

use glassbox_model::{load_tokenizer, ChatContext, ChatTemplate, ModelSource};
use std::path::{Path, PathBuf};

fn shared() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared")
}

/// Every case encodes (no BOS/EOS) to exactly the `.out` ids; decoding gives the text back
/// where the vocabulary can represent it.
fn check_vocab(name: &str) {
    check_vocab_in(&shared().join("tokenizers"), name);
}

fn check_vocab_in(dir: &Path, name: &str) {
    let gguf = dir.join(format!("ggml-vocab-{name}.gguf"));
    let bundle = load_tokenizer(&ModelSource::Gguf(gguf.clone())).unwrap();
    let tok = &bundle.tokenizer;
    let inp = std::fs::read_to_string(dir.join(format!("ggml-vocab-{name}.gguf.inp"))).unwrap();
    let out = std::fs::read_to_string(dir.join(format!("ggml-vocab-{name}.gguf.out"))).unwrap();
    let sep = "\n__ggml_vocab_test__\n";
    let cases: Vec<&str> = inp.strip_suffix(sep).unwrap_or(&inp).split(sep).collect();
    let expected: Vec<&str> = out.lines().collect();
    assert_eq!(cases.len(), expected.len(), "{name}: case count");
    let mut failures = vec![];
    let mut round_trips = 0;
    for (text, want) in cases.iter().zip(&expected) {
        let want: Vec<u32> = want.split_whitespace().map(|t| t.parse().unwrap()).collect();
        let got = tok.encode(text, false).unwrap();
        if got != want {
            failures.push(format!("{text:?}\n   want {want:?}\n   got  {got:?}"));
            continue;
        }
        let back = tok.decode(&got, false).unwrap();
        // WordPiece lowercases, drops accents and normalizes spaces: no round trip to expect.
        if name.starts_with("bert") {
            continue;
        }
        // SentencePiece vocabularies drop the leading space they add; byte-level BPE is exact.
        let same = back == *text || back == text.trim_start_matches(' ') || format!(" {back}") == *text;
        if same {
            round_trips += 1;
        } else if !text.chars().any(|c| c == '\u{FFFD}') {
            failures.push(format!("{text:?}: decodes to {back:?}"));
        }
    }
    println!("{name}: {} cases, {round_trips} round-trip", cases.len());
    assert!(failures.is_empty(), "{name}: {} failures:\n{}", failures.len(), failures.join("\n"));
}

/// Vocabulary types glassbox refuses with a clear error (never tokenizing silently wrong).
const UNSUPPORTED: &[(&str, &str)] = &[];

/// Every vocabulary test llama.cpp ships (from the llama-cpp-python source package, fetched
/// once into the cache): all cases exact, except the vocabulary types in `UNSUPPORTED`, which
/// must be refused.
#[test]
fn vocab_llama_cpp_suite() {
    let dir = glassbox_model::fetch::llama_cpp_vocab_tests().unwrap();
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(|e| e.unwrap().file_name().to_string_lossy().strip_prefix("ggml-vocab-").and_then(|n| n.strip_suffix(".gguf.inp")).map(str::to_string))
        .collect();
    names.sort();
    assert!(names.len() >= 15, "{names:?}");
    let mut passed = 0;
    for n in &names {
        if let Some((_, why)) = UNSUPPORTED.iter().find(|(u, _)| u == n) {
            let err = load_tokenizer(&ModelSource::Gguf(dir.join(format!("ggml-vocab-{n}.gguf")))).err().map(|e| e.to_string()).unwrap_or_default();
            assert!(err.contains(why), "{n}: expected a clear refusal ({why}), got {err:?}");
            continue;
        }
        check_vocab_in(&dir, n);
        passed += 1;
    }
    println!("llama.cpp vocabulary tests: {passed}/{} vocabularies exact ({} refused: {:?})", names.len(), UNSUPPORTED.len(), UNSUPPORTED.iter().map(|u| u.0).collect::<Vec<_>>());
}

#[test]
fn vocab_gpt2() {
    check_vocab("gpt-2");
}
#[test]
fn vocab_llama_bpe() {
    check_vocab("llama-bpe");
}
#[test]
fn vocab_llama_spm() {
    check_vocab("llama-spm");
}
#[test]
fn vocab_phi3() {
    check_vocab("phi-3");
}
#[test]
fn vocab_qwen2() {
    check_vocab("qwen2");
}

#[test]
fn chat_templates_render_like_jinja2() {
    let dir = shared().join("chat-templates");
    let mut names: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "jinja"))
        .collect();
    names.sort();
    let mut failures = vec![];
    let mut total = 0;
    for path in names {
        let stem = path.file_stem().unwrap().to_string_lossy().to_string();
        let tmpl = ChatTemplate::new(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let cases: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join(format!("{stem}.cases.json"))).unwrap()).unwrap();
        for case in cases.as_array().unwrap() {
            total += 1;
            let mut vars = serde_json::Map::new();
            for (k, v) in case.as_object().unwrap() {
                if !["messages", "add_generation_prompt", "bos_token", "eos_token", "expected", "expected_error", "conversation"].contains(&k.as_str()) {
                    vars.insert(k.clone(), v.clone());
                }
            }
            let ctx = ChatContext {
                add_generation_prompt: case["add_generation_prompt"].as_bool().unwrap_or(false),
                bos_token: case["bos_token"].as_str().unwrap_or_default().into(),
                eos_token: case["eos_token"].as_str().unwrap_or_default().into(),
                vars,
            };
            let got = tmpl.render(&case["messages"], &ctx);
            let label = format!("{stem}/{} (gen={})", case["conversation"], ctx.add_generation_prompt);
            match (got, case.get("expected"), case.get("expected_error")) {
                (Ok(s), Some(want), _) if s == want.as_str().unwrap() => {}
                (Ok(s), Some(want), _) => failures.push(format!("{label}\n  want {:?}\n  got  {s:?}", want.as_str().unwrap())),
                (Err(e), _, Some(err)) => {
                    let msg = err.as_str().unwrap().trim_start_matches("TemplateError: ");
                    if !e.to_string().contains(msg) {
                        failures.push(format!("{label}: error {e} does not say {msg:?}"));
                    }
                }
                (Ok(s), None, Some(err)) => failures.push(format!("{label}: rendered {s:?}, expected error {err}")),
                (Err(e), ..) => failures.push(format!("{label}: unexpected error {e}")),
                (Ok(_), None, None) => panic!("{label}: case has neither expected nor expected_error"),
            }
        }
    }
    println!("{total} chat template cases");
    assert!(failures.is_empty(), "{} of {total} failed:\n{}", failures.len(), failures.join("\n"));
}
