//! The engine end to end on real models: reference continuations, batch invariance,
//! sampling features, preemption and aborts.

use glassbox_engine::{EngineConfig, KvMemory, RequestOutput, LLM};
use glassbox_model::{load, LoadOptions, LoadedModel, ModelSource};
use glassbox_protocol::{CapturePositions, CaptureSpec, EngineRequest, FinishReason, HookName, SamplingParams, Site};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

fn shared() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared")
}

fn stories() -> Arc<LoadedModel> {
    static M: OnceLock<Arc<LoadedModel>> = OnceLock::new();
    M.get_or_init(|| Arc::new(load(&ModelSource::HfDir(shared().join("models/stories260K")), LoadOptions::default()).unwrap())).clone()
}

fn smollm() -> Arc<LoadedModel> {
    static M: OnceLock<Arc<LoadedModel>> = OnceLock::new();
    M.get_or_init(|| {
        let path = glassbox_model::fetch::DEFAULT_MODEL.ensure().unwrap();
        Arc::new(load(&ModelSource::Gguf(path), LoadOptions::default()).unwrap())
    })
    .clone()
}

/// The default model on the exact path (`--dequantize`): what reproduces the reference's
/// greedy continuations token for token. (The default path quantizes activations to 8 bits,
/// as llama.cpp does; the model tests bound its distance by KL.)
fn smollm_exact() -> Arc<LoadedModel> {
    static M: OnceLock<Arc<LoadedModel>> = OnceLock::new();
    M.get_or_init(|| {
        let path = glassbox_model::fetch::DEFAULT_MODEL.ensure().unwrap();
        Arc::new(load(&ModelSource::Gguf(path), LoadOptions { dequantize: true, ..LoadOptions::default() }).unwrap())
    })
    .clone()
}

fn cfg(f: impl FnOnce(&mut EngineConfig)) -> EngineConfig {
    let mut c = EngineConfig { kv_cache_memory: KvMemory::Bytes(64 << 20), block_size: 4, ..Default::default() };
    f(&mut c);
    c
}

fn greedy(max_tokens: usize) -> SamplingParams {
    SamplingParams { max_tokens, ..Default::default() }
}

struct RefCase {
    input: Vec<u32>,
    greedy: Vec<u32>,
}

fn reference(model: &str) -> Vec<RefCase> {
    let dir = shared().join("reference").join(model);
    let manifest: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("manifest.json")).unwrap()).unwrap();
    let ids = |v: &serde_json::Value| v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect::<Vec<_>>();
    manifest["cases"].as_array().unwrap().iter().map(|c| RefCase { input: ids(&c["input_ids"]), greedy: ids(&c["greedy_continuation"]) }).collect()
}

#[test]
fn greedy_through_the_engine_equals_reference() {
    for (name, model) in [("stories260K", stories()), ("smollm2-135m-instruct", smollm_exact())] {
        let cases = reference(name);
        // All cases in one batch, and with a token budget that chunks the prompts.
        for budget in [512, 7] {
            let mut llm = LLM::from_model(model.clone(), cfg(|c| c.max_num_batched_tokens = budget)).unwrap();
            let reqs = cases.iter().map(|c| (c.input.clone(), SamplingParams { ignore_eos: true, ..greedy(c.greedy.len()) }, None)).collect();
            for (out, case) in llm.generate_tokens(reqs).iter().zip(&cases) {
                assert_eq!(out.outputs[0].token_ids, case.greedy, "{name}, budget {budget}");
            }
        }
    }
}

#[test]
fn stories260k_prompt_text_through_the_offline_api() {
    let mut llm = LLM::from_model(stories(), cfg(|_| {})).unwrap();
    let out = llm.generate(&["Once upon a time"], &greedy(24)).unwrap();
    assert_eq!(out[0].outputs[0].text, ", there was a little girl named Lily. She loved to play outside in the p");
    assert_eq!(out[0].outputs[0].finish_reason, Some(FinishReason::Length));
}

/// Prompts of different lengths, some sharing long prefixes.
fn invariance_prompts(model: &LoadedModel) -> Vec<Vec<u32>> {
    let texts = [
        "Once upon a time",
        "Once upon a time, there was a little girl named Lily. She",
        "Once upon a time, there was a little girl named Lily. She loved to",
        "Lily and Tom went to the park. They saw a big",
        "Lily and Tom went to the park. They saw a big dog and",
        "The little dog was sad because he lost his ball.",
        "The sun",
        "Tim had a red ball. He",
        "One day, a cat",
        "Once upon a time, there was a little girl named Lily. She loved to play outside in the park with",
        "Sue liked to sing",
        "The big tree was",
        "Lily and Tom went to the park. They",
        "A bird flew over the house and saw",
        "Mom said",
        "The little dog was sad because he lost his ball. His mom said",
    ];
    texts.iter().map(|t| model.tokenizer.encode(t, true).unwrap()).collect()
}

fn logits_capture() -> Option<CaptureSpec> {
    Some(CaptureSpec { hooks: vec![HookName::global(Site::Logits)], positions: CapturePositions::Generated, dtype: Default::default() })
}

fn bits(out: &RequestOutput) -> (Vec<u32>, Vec<u32>) {
    let c = &out.outputs[0];
    let logits = c.captures.iter().find(|c| c.hook.site == Site::Logits).expect("logits captured");
    (c.token_ids.clone(), logits.to_f32().iter().map(|v| v.to_bits()).collect())
}

fn check_batch_invariance(model: Arc<LoadedModel>) {
    let prompts = invariance_prompts(&model);
    let params = SamplingParams { ignore_eos: true, ..greedy(12) };
    let alone: Vec<_> = prompts
        .iter()
        .map(|p| {
            let mut llm = LLM::from_model(model.clone(), cfg(|_| {})).unwrap();
            bits(&llm.generate_tokens(vec![(p.clone(), params.clone(), logits_capture())])[0])
        })
        .collect();
    // Together (prefix cache shared), in a different order, with chunked prefill.
    for budget in [4096, 13] {
        let mut llm = LLM::from_model(model.clone(), cfg(|c| c.max_num_batched_tokens = budget)).unwrap();
        let order: Vec<usize> = (0..prompts.len()).rev().collect();
        let reqs = order.iter().map(|&i| (prompts[i].clone(), params.clone(), logits_capture())).collect();
        let outs = llm.generate_tokens(reqs);
        for (out, &i) in outs.iter().zip(&order) {
            let got = bits(out);
            assert_eq!(got.0, alone[i].0, "prompt {i}: tokens differ batched (budget {budget})");
            assert!(got.1 == alone[i].1, "prompt {i}: logits differ bitwise batched (budget {budget})");
        }
        // Requests admitted in the same step cannot share blocks not yet computed; with a
        // small budget they are admitted over several steps and must hit the cache.
        if budget < 100 {
            assert!(llm.core().stats().prefix_hits > 0, "the shared prefixes were served from the cache");
        }
    }
}

#[test]
fn batch_invariance_stories260k() {
    check_batch_invariance(stories());
}

#[test]
fn batch_invariance_smollm2() {
    check_batch_invariance(smollm());
}

#[test]
fn prompt_logits_invariant_to_chunking_and_batching() {
    let model = stories();
    let prompts = invariance_prompts(&model);
    let spec = Some(CaptureSpec { hooks: vec![HookName::global(Site::Logits), HookName::block(2, Site::ResidPost)], positions: CapturePositions::All, dtype: Default::default() });
    let params = greedy(3);
    let run = |budget: usize, which: &[usize]| {
        let mut llm = LLM::from_model(model.clone(), cfg(|c| c.max_num_batched_tokens = budget)).unwrap();
        let outs = llm.generate_tokens(which.iter().map(|&i| (prompts[i].clone(), params.clone(), spec.clone())).collect());
        outs.into_iter().map(|o| o.outputs[0].captures.iter().map(|c| c.data.clone()).collect::<Vec<_>>()).collect::<Vec<_>>()
    };
    let all: Vec<usize> = (0..prompts.len()).collect();
    let batched = run(5, &all);
    for i in [0, 9, 15] {
        assert_eq!(run(4096, &[i])[0], batched[i], "prompt {i}");
    }
}

#[test]
fn seeded_sampling_is_the_same_alone_and_batched() {
    let model = stories();
    let sampled = SamplingParams { temperature: 0.9, top_p: 0.95, seed: Some(1234), ignore_eos: true, ..greedy(20) };
    let prompt = model.tokenizer.encode("Once upon a time", true).unwrap();
    let mut llm = LLM::from_model(model.clone(), cfg(|_| {})).unwrap();
    let alone = llm.generate_tokens(vec![(prompt.clone(), sampled.clone(), None)])[0].outputs[0].text.clone();
    let mut others: Vec<_> = invariance_prompts(&model).into_iter().map(|p| (p, SamplingParams { temperature: 1.0, ..greedy(15) }, None)).collect();
    others.insert(5, (prompt, sampled, None));
    let batched = LLM::from_model(model, cfg(|c| c.max_num_batched_tokens = 9)).unwrap().generate_tokens(others);
    assert_eq!(batched[5].outputs[0].text, alone);
    // And a different seed gives something else.
    assert_ne!(alone, batched[0].outputs[0].text);
}

#[test]
fn stop_strings_end_the_text_also_across_tokens() {
    let mut llm = LLM::from_model(stories(), cfg(|_| {})).unwrap();
    let run = |llm: &mut LLM, stop: &[&str]| {
        let p = SamplingParams { stop: stop.iter().map(|s| s.to_string()).collect(), ..greedy(24) };
        llm.generate(&["Once upon a time"], &p).unwrap().remove(0).outputs.remove(0)
    };
    let out = run(&mut llm, &["girl"]);
    assert_eq!((out.text.as_str(), out.finish_reason), (", there was a little ", Some(FinishReason::Stop)));
    // "le gi" spans the tokens of "little" and " girl".
    let out = run(&mut llm, &["zebra", "le gi"]);
    assert_eq!((out.text.as_str(), out.finish_reason), (", there was a litt", Some(FinishReason::Stop)));
    // Stop token ids.
    let girl = llm.core().model().tokenizer.encode(" girl", false).unwrap();
    let p = SamplingParams { stop_token_ids: vec![*girl.last().unwrap()], ..greedy(24) };
    let out = llm.generate(&["Once upon a time"], &p).unwrap().remove(0).outputs.remove(0);
    assert_eq!(out.finish_reason, Some(FinishReason::Stop));
    assert!(out.text.starts_with(", there was a little") && !out.text.contains("named"), "{}", out.text);
}

#[test]
fn n_completions_share_the_prompt_and_differ() {
    let mut llm = LLM::from_model(stories(), cfg(|_| {})).unwrap();
    let p = SamplingParams { n: 4, temperature: 1.0, seed: Some(5), ignore_eos: true, ..greedy(16) };
    let out = llm.generate(&["Lily and Tom went to the park. They saw a big"], &p).unwrap().remove(0);
    assert_eq!(out.outputs.len(), 4);
    assert!(out.outputs.iter().enumerate().all(|(i, o)| o.index == i && o.token_ids.len() == 16));
    let distinct: std::collections::HashSet<_> = out.outputs.iter().map(|o| o.text.clone()).collect();
    assert!(distinct.len() > 1, "n samples were all the same");
    assert!(llm.core().stats().prefix_hits >= 3, "followers reuse the prompt's blocks");
}

#[test]
fn logprobs_match_the_chosen_tokens() {
    let mut llm = LLM::from_model(stories(), cfg(|_| {})).unwrap();
    let p = SamplingParams { logprobs: Some(3), ..greedy(8) };
    let out = llm.generate(&["Once upon a time"], &p).unwrap().remove(0).outputs.remove(0);
    assert_eq!(out.logprobs.len(), 8);
    for (lp, &tok) in out.logprobs.iter().zip(&out.token_ids) {
        assert_eq!(lp.token, tok);
        assert_eq!(lp.top.len(), 3);
        // Greedy: the chosen token is the most likely one.
        assert_eq!(lp.top[0].0, tok);
        assert!(lp.logprob <= 0.0 && lp.top[0].1 >= lp.top[1].1 && lp.top[1].1 >= lp.top[2].1);
    }
}

#[test]
fn penalties_change_repetitive_output() {
    let mut llm = LLM::from_model(stories(), cfg(|_| {})).unwrap();
    let prompt = "Lily and Tom went to the park. They saw a big";
    let plain = llm.generate(&[prompt], &greedy(24)).unwrap().remove(0).outputs.remove(0).text;
    assert!(plain.matches("They wanted to play with").count() >= 2, "{plain}");
    for p in [
        SamplingParams { repetition_penalty: 1.5, ..greedy(24) },
        SamplingParams { frequency_penalty: 1.0, ..greedy(24) },
        SamplingParams { presence_penalty: 1.5, ..greedy(24) },
    ] {
        let text = llm.generate(&[prompt], &p).unwrap().remove(0).outputs.remove(0).text;
        assert_ne!(text, plain, "{p:?} changed nothing");
    }
}

#[test]
fn min_tokens_and_ignore_eos() {
    let mut llm = LLM::from_model(stories(), cfg(|_| {})).unwrap();
    // stories260K ends stories with EOS quickly after "The end." style text; ignore_eos runs to max_tokens.
    let p = SamplingParams { ignore_eos: true, ..greedy(200) };
    let out = llm.generate(&["The little dog was sad because he lost his ball. His mom said"], &p).unwrap().remove(0).outputs.remove(0);
    assert_eq!((out.token_ids.len(), out.finish_reason), (200, Some(FinishReason::Length)));
    let p = SamplingParams { min_tokens: 150, ..greedy(150) };
    let out = llm.generate(&["The little dog was sad because he lost his ball. His mom said"], &p).unwrap().remove(0).outputs.remove(0);
    assert_eq!(out.token_ids.len(), 150);
    assert!(!out.token_ids.contains(&2), "EOS before min_tokens");
}

#[test]
fn preemption_under_a_tiny_kv_budget_still_gives_reference_output() {
    let cases = reference("stories260K");
    let model = stories();
    let mc = &model.model.cfg;
    // 12 blocks of 4 tokens: the three cases need more than that together.
    let bytes = 12 * 2 * mc.num_layers * 4 * mc.num_kv_heads * mc.head_dim * 4;
    let mut llm = LLM::from_model(model.clone(), cfg(|c| c.kv_cache_memory = KvMemory::Bytes(bytes as u64))).unwrap();
    let reqs = cases.iter().map(|c| (c.input.clone(), SamplingParams { ignore_eos: true, ..greedy(c.greedy.len()) }, None)).collect();
    let outs = llm.generate_tokens(reqs);
    for (o, c) in outs.iter().zip(&cases) {
        assert_eq!(o.outputs[0].token_ids, c.greedy);
    }
    let stats = llm.core().stats();
    assert!(stats.preemptions > 0, "the budget was meant to force preemption");
    assert_eq!(stats.kv_blocks_used, 0, "blocks leaked");
}

#[test]
fn abort_frees_blocks_and_answers_once() {
    let model = stories();
    let mut llm = LLM::from_model(model.clone(), cfg(|_| {})).unwrap();
    let prompt = model.tokenizer.encode("Once upon a time", true).unwrap();
    for id in 0..3 {
        llm.core_mut().add_request(EngineRequest { id, prompt: prompt.clone(), sampling: greedy(50), capture: None, ..Default::default() });
    }
    let first = llm.core_mut().step();
    assert_eq!(first.len(), 3);
    llm.core_mut().abort(1);
    let mut finishes = vec![];
    llm.stream(|o| {
        if let Some(f) = o.finish {
            finishes.push((o.id, f));
        }
    });
    finishes.sort_by_key(|f| f.0);
    assert_eq!(finishes.iter().map(|f| f.0).collect::<Vec<_>>(), vec![0, 1, 2]);
    assert_eq!(finishes[1].1, FinishReason::Abort);
    assert_eq!(llm.core().stats().kv_blocks_used, 0);
}

#[test]
fn bad_requests_become_error_outputs() {
    let model = stories();
    let mut llm = LLM::from_model(model, cfg(|c| c.max_model_len = Some(64))).unwrap();
    let long = vec![1u32; 64];
    let outs = llm.generate_tokens(vec![
        (long, greedy(4), None),
        (vec![], greedy(4), None),
        (vec![1, 100000], greedy(4), None),
        (vec![1, 5], SamplingParams { max_tokens: 0, ..greedy(4) }, None),
        (vec![1, 5], greedy(4), Some(CaptureSpec { hooks: vec![HookName::block(40, Site::Q)], positions: CapturePositions::All, dtype: Default::default() })),
        (vec![1, 5], greedy(4), None),
    ]);
    let reasons: Vec<String> = outs
        .iter()
        .map(|o| match &o.outputs[0].finish_reason {
            Some(FinishReason::Error(m)) => m.clone(),
            other => format!("{other:?}"),
        })
        .collect();
    assert!(reasons[0].contains("maximum context length is 64 tokens"), "{}", reasons[0]);
    assert!(reasons[1].contains("empty"));
    assert!(reasons[2].contains("outside the vocabulary"));
    assert!(reasons[3].contains("max_tokens"));
    assert!(reasons[4].contains("blocks.40.attn.hook_q"));
    assert_eq!(reasons[5], "Some(Length)");
}

#[test]
fn engine_thread_answers_every_request_once() {
    use glassbox_engine::{EngineCore, EngineHandle};
    let model = stories();
    // Request 3 asks for 40000 tokens: it cannot finish before the shutdown below.
    let core = EngineCore::new(model.clone(), cfg(|c| c.max_model_len = Some(50_000))).unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let mut handle = EngineHandle::spawn(core, move |outs, stats| {
        let _ = tx.send((outs, stats));
    })
    .unwrap();
    let prompt = model.tokenizer.encode("Once upon a time", true).unwrap();
    for id in 0..4 {
        let sampling = SamplingParams { ignore_eos: true, ..greedy(if id == 3 { 40_000 } else { 5 }) };
        handle.submit(EngineRequest { id, prompt: prompt.clone(), sampling, capture: None, ..Default::default() }).unwrap();
    }
    handle.submit(EngineRequest { id: 9, prompt: vec![], sampling: greedy(5), capture: None, ..Default::default() }).unwrap();
    let mut finished = std::collections::BTreeMap::new();
    let mut last = None;
    while finished.len() < 4 {
        let (outs, stats) = rx.recv_timeout(std::time::Duration::from_secs(30)).expect("engine thread answers");
        for o in outs {
            if let Some(f) = o.finish {
                assert!(finished.insert(o.id, f).is_none(), "request {} finished twice", o.id);
            }
        }
        last = Some(stats);
    }
    // The long request is still running; shutting down aborts and answers it.
    handle.shutdown();
    for (outs, stats) in rx.try_iter() {
        for o in outs {
            if let Some(f) = o.finish {
                assert!(finished.insert(o.id, f).is_none(), "request {} finished twice", o.id);
            }
        }
        last = Some(stats);
    }
    assert_eq!(finished.keys().copied().collect::<Vec<_>>(), vec![0, 1, 2, 3, 9]);
    assert_eq!(finished[&3], FinishReason::Abort);
    assert!(matches!(finished[&9], FinishReason::Error(_)));
    assert_eq!(last.unwrap().kv_blocks_used, 0);
}

/// An f16 KV cache holds twice the tokens in the same memory; each request's numbers still do
/// not depend on its batch; and on stories260K its greedy continuations stay those of the
/// reference (keys and values rounded to f16 move attention by about 1e-3 relative).
#[test]
fn f16_kv_cache_holds_twice_the_tokens_and_stays_batch_invariant() {
    use glassbox_engine::KvDtype;
    let model = stories();
    let with = |dtype| cfg(|c| c.kv_cache_dtype = dtype);
    let cap = |dtype| LLM::from_model(model.clone(), with(dtype)).unwrap().core().kv_capacity_tokens();
    assert_eq!(cap(KvDtype::F16), 2 * cap(KvDtype::F32));
    let cases = reference("stories260K");
    let run = |reqs: &[&RefCase]| {
        let mut llm = LLM::from_model(model.clone(), with(KvDtype::F16)).unwrap();
        let reqs = reqs.iter().map(|c| (c.input.clone(), SamplingParams { ignore_eos: true, logprobs: Some(1), ..greedy(c.greedy.len()) }, None)).collect();
        llm.generate_tokens(reqs)
    };
    let batched = run(&cases.iter().collect::<Vec<_>>());
    for (case, out) in cases.iter().zip(&batched) {
        let alone = run(&[case]);
        assert_eq!(alone[0].outputs[0].token_ids, out.outputs[0].token_ids);
        assert_eq!(format!("{:?}", alone[0].outputs[0].logprobs), format!("{:?}", out.outputs[0].logprobs), "alone vs batched, bitwise");
        assert_eq!(out.outputs[0].token_ids, case.greedy);
    }
}
