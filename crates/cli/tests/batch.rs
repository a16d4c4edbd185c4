//! `glassbox batch` on the in-process engine (stories260K): every input id answered exactly
//! once, failures named by stage, in-flight overlap of stages, resume after a crash.
//! (Against servers, with a flaky one: tests/e2e/test_batch.py.)

use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn stories() -> String {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/models/stories260K").display().to_string()
}

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("glassbox-batch-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn batch(dir: &Path, extra: &[&str]) -> Output {
    let (input, spec, output) = (dir.join("in.jsonl"), dir.join("spec.json"), dir.join("out.jsonl"));
    let mut args = vec!["batch", "--model", &*Box::leak(stories().into_boxed_str()), "--input", input.to_str().unwrap(), "--spec", spec.to_str().unwrap(), "--output", output.to_str().unwrap()];
    args.extend_from_slice(extra);
    Command::new(env!("CARGO_BIN_EXE_glassbox")).args(&args).output().unwrap()
}

fn records(dir: &Path) -> Vec<Value> {
    std::fs::read_to_string(dir.join("out.jsonl")).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

/// 200 items, two stages, 8 in flight; item 13's description is far too long for the model,
/// item 42 lacks the field the template reads, item 77 skips stage 2 by `when`.
fn two_stage_job(dir: &Path) {
    let mut lines = vec![];
    for i in 0..200 {
        let mut item = json!({"id": format!("item-{i}"), "desc": format!("a little dog called number {i}")});
        if i == 13 {
            item["desc"] = json!("word ".repeat(3000));
        }
        if i == 42 {
            item.as_object_mut().unwrap().remove("desc");
        }
        if i == 77 {
            item["desc"] = json!("skip me");
        }
        lines.push(item.to_string());
    }
    std::fs::write(dir.join("in.jsonl"), lines.join("\n") + "\n").unwrap();
    let spec = json!({"stages": [
        {"name": "caption", "prompt": "Once upon a time, {{ desc }}", "max_tokens": 12},
        {"name": "refine", "prompt": "Refine this caption: {{ caption }}", "max_tokens": 8, "when": "desc != 'skip me'"},
    ]});
    std::fs::write(dir.join("spec.json"), spec.to_string()).unwrap();
}

#[test]
fn two_stages_every_id_once_with_errors_named_by_stage() {
    let dir = scratch("two");
    two_stage_job(&dir);
    let o = batch(&dir, &["--max-inflight", "8", "--record-prompts"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    let recs = records(&dir);
    assert_eq!(recs.len(), 200);
    let by_id: HashMap<String, &Value> = recs.iter().map(|r| (r["id"].as_str().unwrap().to_string(), r)).collect();
    assert_eq!(by_id.len(), 200, "every id exactly once");
    let e13 = &by_id["item-13"]["error"];
    assert_eq!(e13["stage"], "caption");
    assert!(e13["message"].as_str().unwrap().contains("tokens"), "{e13}");
    let e42 = &by_id["item-42"]["error"];
    assert_eq!(e42["stage"], "caption");
    assert!(e42["message"].as_str().unwrap().contains("undefined"), "{e42}");
    assert!(by_id["item-77"]["refine"].is_null() && by_id["item-77"]["caption"].is_string());
    for (id, r) in &by_id {
        if ["item-13", "item-42", "item-77"].contains(&id.as_str()) {
            continue;
        }
        let (caption, refine) = (r["caption"].as_str().unwrap(), r["refine"].as_str().unwrap());
        assert!(r.get("error").is_none() && !refine.is_empty(), "{r}");
        assert_eq!(r["prompts"]["refine"], format!("Refine this caption: {caption}"), "stage 2 reads stage 1's output");
        assert_eq!(r["stats"]["refine"]["completion_tokens"], 8);
    }
    // In flight: stage 2 of early items starts before stage 1 of late items has finished.
    let ok: Vec<&&Value> = by_id.values().filter(|r| r["stats"]["refine"].is_object()).collect();
    let first_refine = ok.iter().map(|r| r["stats"]["refine"]["started_ms"].as_f64().unwrap()).fold(f64::MAX, f64::min);
    let last_caption = ok.iter().map(|r| r["stats"]["caption"]["finished_ms"].as_f64().unwrap()).fold(0.0, f64::max);
    assert!(first_refine < last_caption, "no overlap: first refine at {first_refine} ms, last caption at {last_caption} ms");
    assert!(err.contains("200 items: 198 done, 2 failed") && err.contains("errors in stage `caption`: 2"), "{err}");
}

#[test]
fn a_rerun_resumes_after_a_crash_without_redoing_finished_items() {
    let dir = scratch("resume");
    two_stage_job(&dir);
    assert!(batch(&dir, &["--max-inflight", "8"]).status.success());
    let full = std::fs::read_to_string(dir.join("out.jsonl")).unwrap();
    // As if killed while writing record 81: 80 whole records and half of the next.
    let lines: Vec<&str> = full.lines().collect();
    let kept = lines[..80].join("\n") + "\n" + &lines[80][..lines[80].len() / 2];
    std::fs::write(dir.join("out.jsonl"), &kept).unwrap();
    let o = batch(&dir, &["--max-inflight", "8"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success() && err.contains("(80 already in"), "{err}");
    let after = std::fs::read_to_string(dir.join("out.jsonl")).unwrap();
    assert!(after.starts_with(&(lines[..80].join("\n") + "\n")), "finished records are kept as they were");
    let ids: Vec<String> = records(&dir).iter().map(|r| r["id"].to_string()).collect();
    let unique: std::collections::HashSet<&String> = ids.iter().collect();
    assert_eq!((ids.len(), unique.len()), (200, 200));
}

#[test]
fn bad_jobs_fail_before_anything_runs() {
    let dir = scratch("bad");
    two_stage_job(&dir);
    std::fs::write(dir.join("in.jsonl"), "{\"id\": 1, \"desc\": \"a\"}\n{\"id\": 2}\n{\"id\": 1, \"desc\": \"b\"}\n").unwrap();
    let o = batch(&dir, &[]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("line 3: the id 1 appears twice"), "{err}");
    assert!(!dir.join("out.jsonl").exists(), "nothing runs");
    std::fs::write(dir.join("in.jsonl"), "{\"desc\": \"no id\"}\n").unwrap();
    assert!(String::from_utf8_lossy(&batch(&dir, &[]).stderr).contains("line 1: no `id`"));
    std::fs::write(dir.join("in.jsonl"), "{\"id\": 1}\n").unwrap();
    std::fs::write(dir.join("spec.json"), json!({"stages": [{"name": "a", "prompt": "{{ x"}]}).to_string()).unwrap();
    assert!(String::from_utf8_lossy(&batch(&dir, &[]).stderr).contains("stage `a`: the prompt template does not parse"));
}
