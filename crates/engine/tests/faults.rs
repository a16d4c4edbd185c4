//! Faults: every request gets exactly one finishing output, whatever fails and wherever; the
//! KV cache can never hold a request hostage; a failing step leaves a crash dump.
//! Built with the `fault-injection` feature (test builds have it): `set_fault` makes requests
//! with a chosen seed fail in a chosen phase.

use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use glassbox_engine::crash;
use glassbox_engine::fault::{FaultKind, FaultPlan, Phase};
use glassbox_engine::{EngineConfig, EngineCore, KvMemory};
use glassbox_model::{load, LoadOptions, LoadedModel, ModelSource};
use glassbox_protocol::{CapturePositions, CaptureSpec, EngineOutput, EngineRequest, FinishReason, HookName, RequestId, SamplingParams, Site};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

fn shared() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared")
}

fn stories() -> Arc<LoadedModel> {
    static M: OnceLock<Arc<LoadedModel>> = OnceLock::new();
    M.get_or_init(|| Arc::new(load(&ModelSource::HfDir(shared().join("models/stories260K")), LoadOptions::default()).unwrap())).clone()
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("glassbox-faults-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn engine(model: Arc<LoadedModel>, f: impl FnOnce(&mut EngineConfig)) -> EngineCore {
    let mut c = EngineConfig { kv_cache_memory: KvMemory::Bytes(16 << 20), block_size: 4, ..Default::default() };
    f(&mut c);
    EngineCore::new(model, c).unwrap()
}

fn request(id: RequestId, prompt: Vec<u32>, max_tokens: usize, seed: u64) -> EngineRequest {
    EngineRequest { id, prompt, sampling: SamplingParams { max_tokens, ignore_eos: true, temperature: 0.8, seed: Some(seed), ..Default::default() }, capture: None, ..Default::default() }
}

/// Step until idle as the engine thread does (a panic that escapes `step` is recovered), with
/// a bound so a hang fails the test instead of hanging it. Outputs by request id.
fn run(core: &mut EngineCore) -> HashMap<RequestId, Vec<EngineOutput>> {
    let mut outs: HashMap<RequestId, Vec<EngineOutput>> = HashMap::new();
    for _ in 0..10_000 {
        if !core.has_work() {
            return outs;
        }
        assert!(!core.stalled(), "the engine stalled with work left");
        let step = match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| core.step())) {
            Ok(o) => o,
            Err(p) => core.recover(&glassbox_engine::core::panic_message(p.as_ref())),
        };
        for o in step {
            outs.entry(o.id).or_default().push(o);
        }
    }
    panic!("the engine did not finish in 10,000 steps");
}

/// Exactly one finishing output per (request, index), and it is the last one.
fn finishes(outs: &HashMap<RequestId, Vec<EngineOutput>>) -> HashMap<RequestId, FinishReason> {
    let mut result = HashMap::new();
    for (id, list) in outs {
        let finals: Vec<&EngineOutput> = list.iter().filter(|o| o.finish.is_some()).collect();
        assert_eq!(finals.len(), 1, "request {id}: {} finishing outputs", finals.len());
        assert!(list.last().unwrap().finish.is_some(), "request {id}: output after its finish");
        result.insert(*id, finals[0].finish.clone().unwrap());
    }
    result
}

fn tokens(outs: &HashMap<RequestId, Vec<EngineOutput>>, id: RequestId) -> Vec<u32> {
    outs[&id].iter().flat_map(|o| o.new_tokens.iter().copied()).collect()
}

fn prompt(model: &LoadedModel, text: &str) -> Vec<u32> {
    model.tokenizer.encode(text, true).unwrap()
}

#[test]
fn a_request_the_kv_cache_cannot_hold_is_refused_and_the_next_is_served() {
    // 8 blocks of 4 tokens: 32 tokens of KV. The model's 256-token context is capped to it.
    let m = stories();
    let per_block = 2 * m.model.cfg.num_layers * 4 * m.model.cfg.num_kv_heads * m.model.cfg.head_dim * 4;
    let mut core = engine(m.clone(), |c| c.kv_cache_memory = KvMemory::Bytes(8 * per_block as u64));
    assert_eq!(core.limits().max_model_len, 32);
    let p = prompt(&m, "Once upon a time");
    core.add_request(request(1, p.clone(), 300, 1));
    core.add_request(request(2, p.clone(), 8, 2));
    let outs = run(&mut core);
    let fin = finishes(&outs);
    match &fin[&1] {
        FinishReason::Error(m) => assert!(m.contains("maximum context length is 32"), "{m}"),
        other => panic!("expected an error, got {other:?}"),
    }
    assert_eq!(fin[&2], FinishReason::Length);
    assert_eq!(tokens(&outs, 2).len(), 8);
    assert_eq!(core.stats().kv_blocks_used, 0);

    // Asking for more than the cache holds explicitly is refused at startup, naming the flags.
    let cfg = EngineConfig { kv_cache_memory: KvMemory::Bytes(8 * per_block as u64), block_size: 4, max_model_len: Some(200), ..Default::default() };
    let err = EngineCore::new(m, cfg).err().expect("must refuse").to_string();
    assert!(err.contains("--kv-cache-memory") && err.contains("--max-model-len"), "{err}");
}

#[test]
fn sequences_that_outgrow_a_shared_cache_all_finish() {
    // Several sequences that each fit alone but not together: preemption sorts it out, no
    // request waits forever, the engine never stalls.
    let m = stories();
    let per_block = 2 * m.model.cfg.num_layers * 4 * m.model.cfg.num_kv_heads * m.model.cfg.head_dim * 4;
    let mut core = engine(m.clone(), |c| c.kv_cache_memory = KvMemory::Bytes(12 * per_block as u64));
    let p = prompt(&m, "Once upon a time");
    for id in 0..6 {
        core.add_request(request(id, p.clone(), 40, id));
    }
    let outs = run(&mut core);
    for (id, f) in finishes(&outs) {
        assert_eq!(f, FinishReason::Length, "request {id}");
        assert_eq!(tokens(&outs, id).len(), 40);
    }
    assert!(core.stats().preemptions > 0);
    assert_eq!(core.stats().kv_blocks_used, 0);
}

/// A random-weight Llama GGUF whose output layer is Q4_K with hidden size 256: candle runs it
/// one row at a time for batch invariance, and a prompt chunk with no logits row used to
/// reach `Tensor::cat(&[])`.
fn rowwise_output_model() -> Arc<LoadedModel> {
    let stories_gguf = shared().join("models/stories260K/stories260K.gguf");
    let mut f = std::fs::File::open(&stories_gguf).unwrap();
    let content = gguf_file::Content::read(&mut f).unwrap();
    let (d, ff, vocab, heads) = (256usize, 512usize, 512usize, 4u32);
    let mut meta = content.metadata.clone();
    for (k, v) in [
        ("llama.embedding_length", d as u32),
        ("llama.feed_forward_length", ff as u32),
        ("llama.block_count", 1),
        ("llama.attention.head_count", heads),
        ("llama.attention.head_count_kv", heads),
        ("llama.rope.dimension_count", d as u32 / heads),
        ("llama.context_length", 4096),
    ] {
        meta.insert(k.to_string(), gguf_file::Value::U32(v));
    }
    let rand = |shape: (usize, usize), dtype| {
        let t = (Tensor::randn(0f32, 1.0, shape, &Device::Cpu).unwrap() * (1.0 / (shape.1 as f64).sqrt())).unwrap();
        QTensor::quantize(&t, dtype).unwrap()
    };
    let ones = |n| QTensor::quantize(&Tensor::ones(n, candle_core::DType::F32, &Device::Cpu).unwrap(), GgmlDType::F32).unwrap();
    let tensors = vec![
        ("token_embd.weight", rand((vocab, d), GgmlDType::F32)),
        ("output.weight", rand((vocab, d), GgmlDType::Q4K)),
        ("output_norm.weight", ones(d)),
        ("blk.0.attn_norm.weight", ones(d)),
        ("blk.0.ffn_norm.weight", ones(d)),
        ("blk.0.attn_q.weight", rand((d, d), GgmlDType::Q8_0)),
        ("blk.0.attn_k.weight", rand((d, d), GgmlDType::Q8_0)),
        ("blk.0.attn_v.weight", rand((d, d), GgmlDType::Q8_0)),
        ("blk.0.attn_output.weight", rand((d, d), GgmlDType::Q8_0)),
        ("blk.0.ffn_gate.weight", rand((ff, d), GgmlDType::Q4K)),
        ("blk.0.ffn_up.weight", rand((ff, d), GgmlDType::Q4K)),
        ("blk.0.ffn_down.weight", rand((d, ff), GgmlDType::Q8_0)),
    ];
    let path = scratch("rowwise").join("rowwise.gguf");
    let mut out = std::fs::File::create(&path).unwrap();
    let meta: Vec<(&str, &gguf_file::Value)> = meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let ts: Vec<(&str, &QTensor)> = tensors.iter().map(|(n, t)| (*n, t)).collect();
    gguf_file::write(&mut out, &meta, &ts).unwrap();
    Arc::new(load(&ModelSource::Gguf(path), LoadOptions::default()).unwrap())
}

#[test]
fn a_long_prompt_is_chunked_through_a_rowwise_quantized_output_layer() {
    let m = rowwise_output_model();
    let prompt: Vec<u32> = (0..1500).map(|i| 3 + (i * 7919 % 500) as u32).collect();
    let mut results = vec![];
    // 1,500 tokens in chunks of 512 (steps with no logits row), and in one piece.
    for budget in [512, 2048] {
        let mut core = engine(m.clone(), |c| {
            c.max_num_batched_tokens = budget;
            c.kv_cache_memory = KvMemory::Bytes(64 << 20);
        });
        core.add_request(EngineRequest { id: 0, prompt: prompt.clone(), sampling: SamplingParams { max_tokens: 4, ignore_eos: true, ..Default::default() }, capture: None, ..Default::default() });
        let outs = run(&mut core);
        assert_eq!(finishes(&outs)[&0], FinishReason::Length, "budget {budget}");
        results.push(tokens(&outs, 0));
    }
    assert_eq!(results[0].len(), 4);
    assert_eq!(results[0], results[1], "chunked and whole prefill agree (batch invariance)");
}

/// Four requests, one of which (seed 666) fails in `phase`; captures on for the hook phase.
fn faulty_batch(m: &LoadedModel) -> Vec<EngineRequest> {
    let texts = ["Once upon a time", "Lily and Tom went to the park", "The cat sat on the mat and", "One day, a little bird"];
    texts
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let mut r = request(i as RequestId, prompt(m, t), 12, if i == 2 { 666 } else { i as u64 });
            r.capture = Some(CaptureSpec { hooks: vec![HookName::block(1, Site::ResidPost)], positions: CapturePositions::Last, dtype: Default::default() });
            r
        })
        .collect()
}

#[test]
fn a_fault_in_any_phase_fails_only_its_request() {
    let m = stories();
    let baseline = {
        let mut core = engine(m.clone(), |_| {});
        for r in faulty_batch(&m) {
            core.add_request(r);
        }
        run(&mut core)
    };
    for phase in [Phase::Schedule, Phase::Forward, Phase::Sample, Phase::Detokenize, Phase::Hook] {
        for kind in [FaultKind::Panic, FaultKind::Error] {
            let dir = scratch(&format!("{phase:?}-{kind:?}"));
            let mut core = engine(m.clone(), |c| c.crash_dump_dir = Some(dir.clone()));
            core.set_fault(Some(FaultPlan { phase, kind, seed: 666 }));
            for r in faulty_batch(&m) {
                core.add_request(r);
            }
            let outs = run(&mut core);
            let fin = finishes(&outs);
            let what = format!("{phase:?}/{kind:?}");
            match &fin[&2] {
                FinishReason::Error(msg) => assert!(msg.contains("injected fault") && msg.contains("crash dump"), "{what}: {msg}"),
                other => panic!("{what}: the faulty request finished with {other:?}"),
            }
            for id in [0, 1, 3] {
                assert_eq!(fin[&id], FinishReason::Length, "{what}: request {id}");
                assert_eq!(tokens(&outs, id), tokens(&baseline, id), "{what}: request {id} changed");
                let last = outs[&id].last().unwrap();
                assert_eq!(last.capture, baseline[&id].last().unwrap().capture, "{what}: request {id} captures changed");
            }
            let stats = core.stats();
            assert_eq!((stats.running, stats.waiting, stats.kv_blocks_used), (0, 0, 0), "{what}");
            // One crash dump, naming the faulty request and holding everything to rerun it.
            let dumps: Vec<_> = std::fs::read_dir(&dir).unwrap().flatten().map(|e| e.path()).collect();
            assert_eq!(dumps.len(), 1, "{what}: {dumps:?}");
            let dump = crash::read(&dumps[0]).unwrap();
            assert_eq!(dump.failed.iter().map(|f| f.request).collect::<Vec<_>>(), vec![2], "{what}");
            let faulty = dump.requests.iter().find(|r| r.request.id == 2).expect("the faulty request is in the dump");
            assert_eq!(faulty.request.sampling.seed, Some(666));
            assert!(dump.step.is_some(), "{what}: the failing step is recorded");
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

#[test]
fn a_panic_outside_request_work_loses_no_output() {
    // A panic in the step's own code cannot be pinned on a request: every request in flight
    // gets an error, and what was decided before (a rejection, an abort) is still delivered.
    let m = stories();
    let dir = scratch("step");
    let mut core = engine(m.clone(), |c| c.crash_dump_dir = Some(dir.clone()));
    core.set_fault(Some(FaultPlan { phase: Phase::Step, kind: FaultKind::Panic, seed: 666 }));
    for r in faulty_batch(&m) {
        core.add_request(r);
    }
    core.add_request(EngineRequest { id: 9, prompt: vec![], sampling: SamplingParams::default(), capture: None, ..Default::default() });
    core.abort(1);
    let outs = run(&mut core);
    let fin = finishes(&outs);
    assert!(matches!(&fin[&9], FinishReason::Error(m) if m.contains("empty")), "{:?}", fin[&9]);
    assert_eq!(fin[&1], FinishReason::Abort);
    for id in [0, 2, 3] {
        assert!(matches!(&fin[&id], FinishReason::Error(m) if m.contains("internal error")), "{id}: {:?}", fin[&id]);
    }
    assert_eq!(core.stats().kv_blocks_used, 0);
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1);
    // The engine goes on serving.
    core.set_fault(None);
    core.add_request(request(20, prompt(&m, "Once upon a time"), 5, 1));
    assert_eq!(finishes(&run(&mut core))[&20], FinishReason::Length);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_state_dump_holds_every_request_in_flight() {
    let m = stories();
    let dir = scratch("state");
    let mut core = engine(m.clone(), |c| c.crash_dump_dir = Some(dir.clone()));
    for r in faulty_batch(&m) {
        core.add_request(r);
    }
    core.step();
    core.step();
    let path = core.dump_state("on demand").unwrap();
    let dump = crash::read(&path).unwrap();
    assert_eq!(dump.requests.iter().map(|r| r.request.id).collect::<Vec<_>>(), vec![0, 1, 2, 3]);
    assert!(dump.requests.iter().all(|r| r.sequences[0].generated.len() == 2 && r.request.sampling.seed.is_some()));
    let _ = run(&mut core);
    let _ = std::fs::remove_dir_all(dir);
}
