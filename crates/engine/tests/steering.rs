//! Per-request steering inside a shared batch: exact where it must change nothing, effective
//! where it must change something.

use glassbox_engine::{EngineConfig, KvMemory, RequestOutput, LLM};
use glassbox_model::{load, LoadOptions, LoadedModel, ModelSource};
use glassbox_protocol::{EngineRequest, FinishReason, HookName, SamplingParams, Site, SteerOp, SteerPositions, SteerSpec};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/models/stories260K")
}

fn stories() -> Arc<LoadedModel> {
    static M: OnceLock<Arc<LoadedModel>> = OnceLock::new();
    M.get_or_init(|| Arc::new(load(&ModelSource::HfDir(dir()), LoadOptions::default()).unwrap())).clone()
}

/// stories260K with its matrices in Q8_0: the integer kernels, whose inputs the norms
/// quantize in their own pass.
fn stories_q8() -> Arc<LoadedModel> {
    use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
    static M: OnceLock<Arc<LoadedModel>> = OnceLock::new();
    M.get_or_init(|| {
        let src = std::fs::read(dir().join("stories260K.gguf")).unwrap();
        let mut cursor = std::io::Cursor::new(&src[..]);
        let content = gguf_file::Content::read(&mut cursor).unwrap();
        let tensors: Vec<(String, QTensor)> = content
            .tensor_infos
            .keys()
            .map(|name| {
                let dense = content.tensor(&mut cursor, name, &candle_core::Device::Cpu).unwrap().dequantize(&candle_core::Device::Cpu).unwrap();
                // Rows that fit the blocks (the MLP's 172-wide down projection stays f32).
                let fits = dense.rank() == 2 && dense.dim(1).unwrap().is_multiple_of(32);
                let dtype = if fits { GgmlDType::Q8_0 } else { GgmlDType::F32 };
                (name.clone(), QTensor::quantize(&dense, dtype).unwrap())
            })
            .collect();
        let path = Path::new(env!("CARGO_TARGET_TMPDIR")).join("stories260K-q8_0-steering.gguf");
        let mut out = std::fs::File::create(&path).unwrap();
        let meta: Vec<(&str, &gguf_file::Value)> = content.metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let ts: Vec<(&str, &QTensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
        gguf_file::write(&mut out, &meta, &ts).unwrap();
        Arc::new(load(&ModelSource::Gguf(path), LoadOptions::default()).unwrap())
    })
    .clone()
}

fn llm() -> LLM {
    llm_of(stories())
}

fn llm_of(model: Arc<LoadedModel>) -> LLM {
    LLM::from_model(model, EngineConfig { kv_cache_memory: KvMemory::Bytes(64 << 20), block_size: 4, ..Default::default() }).unwrap()
}

/// Sampled (seeded) with logprobs, so "bitwise unchanged" covers the distributions too.
fn request(text: &str, seed: u64, steer: Vec<SteerSpec>) -> EngineRequest {
    let prompt = stories().tokenizer.encode(text, true).unwrap();
    let sampling = SamplingParams { max_tokens: 20, temperature: 0.8, seed: Some(seed), logprobs: Some(3), ignore_eos: true, ..Default::default() };
    EngineRequest { prompt, sampling, steer, ..Default::default() }
}

fn batch(steered: Option<Vec<SteerSpec>>) -> Vec<EngineRequest> {
    let texts = ["Once upon a time", "Lily and Tom went to the park", "The cat sat on the mat", "One day, a little bird"];
    texts.iter().enumerate().map(|(i, t)| request(t, i as u64, if i == 1 { steered.clone().unwrap_or_default() } else { vec![] })).collect()
}

fn same(a: &RequestOutput, b: &RequestOutput) -> bool {
    let (x, y) = (&a.outputs[0], &b.outputs[0]);
    x.token_ids == y.token_ids && x.logprobs == y.logprobs
}

fn add(hook: HookName, vector: Vec<f32>, scale: f32, positions: SteerPositions) -> SteerSpec {
    SteerSpec { hook, op: SteerOp::Add { vector, scale }, positions, heads: None }
}

#[test]
fn a_zero_steer_changes_nothing_and_a_real_one_changes_only_its_request() {
    let resid = HookName::block(3, Site::ResidPost);
    let plain = llm().generate_requests(batch(None));
    let zero = llm().generate_requests(batch(Some(vec![add(resid, vec![0.0; 64], 1.0, SteerPositions::All)])));
    for (a, b) in plain.iter().zip(&zero) {
        assert!(same(a, b), "a zero steer changed request {}", a.id);
    }
    let push: Vec<f32> = (0..64).map(|i| if i % 2 == 0 { 1.0 } else { -1.0 }).collect();
    let steered = llm().generate_requests(batch(Some(vec![add(resid, push, 3.0, SteerPositions::All)])));
    assert!(!same(&plain[1], &steered[1]), "a real steer changed nothing");
    for i in [0, 2, 3] {
        assert!(same(&plain[i], &steered[i]), "steering request 1 changed request {i}");
    }
}

/// The sites the model rewrites in place or hands to projections pre-quantized (the norms'
/// outputs; q, k and v before and after rotation): a zero steer, which hands back a
/// replacement equal to the rows, changes nothing; a real one changes only its request.
#[test]
fn steering_in_place_sites_lands_where_the_rows_came_from() {
    let (d, kv) = (64, 32);
    for (model, label) in [(stories(), "f32"), (stories_q8(), "Q8_0")] {
        let plain = llm_of(model.clone()).generate_requests(batch(None));
        for (site, width) in [(Site::Ln1, d), (Site::Ln2, d), (Site::Q, d), (Site::K, kv), (Site::V, kv), (Site::RotQ, d), (Site::RotK, kv)] {
            let hook = HookName::block(2, site);
            let zero = llm_of(model.clone()).generate_requests(batch(Some(vec![add(hook, vec![0.0; width], 1.0, SteerPositions::All)])));
            for (a, b) in plain.iter().zip(&zero) {
                assert!(same(a, b), "{label} {hook}: a zero steer changed request {}", a.id);
            }
            let push: Vec<f32> = (0..width).map(|i| if i % 3 == 0 { 2.0 } else { -1.0 }).collect();
            // Generated positions only: one vector added to every key would shift each score of
            // a query by the same amount, which the softmax takes back out.
            let steered = llm_of(model.clone()).generate_requests(batch(Some(vec![add(hook, push, 3.0, SteerPositions::Generated)])));
            assert!(!same(&plain[1], &steered[1]), "{label} {hook}: a real steer changed nothing");
            for i in [0, 2, 3] {
                assert!(same(&plain[i], &steered[i]), "{label} {hook}: steering request 1 changed request {i}");
            }
        }
    }
}

#[test]
fn adding_a_tokens_unembedding_makes_it_appear() {
    // Tied embeddings: the unembedding row of a token is its embedding row.
    let weights = candle_core::safetensors::load(dir().join("model.safetensors"), &candle_core::Device::Cpu).unwrap();
    let embed = weights["model.embed_tokens.weight"].to_dtype(candle_core::DType::F32).unwrap();
    let m = stories();
    let target = m.tokenizer.encode(" dragon", false).unwrap()[0];
    let row: Vec<f32> = embed.get(target as usize).unwrap().to_vec1().unwrap();
    let plain = llm().generate_requests(vec![request("Once upon a time", 7, vec![])]);
    assert!(!plain[0].outputs[0].token_ids.contains(&target));
    let steer = add(HookName::block(4, Site::ResidPost), row, 4.0, SteerPositions::Generated);
    let out = llm().generate_requests(vec![request("Once upon a time", 7, vec![steer])]);
    let hits = out[0].outputs[0].token_ids.iter().filter(|&&t| t == target).count();
    assert!(hits >= 3, "token {target} appeared {hits} times: {:?}", out[0].outputs[0].token_ids);
    // Only generated positions were steered: the first token comes from the unsteered prompt.
    assert_eq!(out[0].outputs[0].token_ids[0], plain[0].outputs[0].token_ids[0]);
}

#[test]
fn ablating_every_head_of_hook_z_equals_zeroing_attn_out() {
    let ablate = |hook, heads| SteerSpec { hook, op: SteerOp::Ablate, positions: SteerPositions::All, heads };
    let z = llm().generate_requests(batch(Some(vec![ablate(HookName::block(2, Site::Z), Some((0..8).collect()))])));
    let z_all = llm().generate_requests(batch(Some(vec![ablate(HookName::block(2, Site::Z), None)])));
    let out = llm().generate_requests(batch(Some(vec![ablate(HookName::block(2, Site::AttnOut), None)])));
    // stories260K's o_proj has no bias, so zero z gives exactly zero attn_out.
    assert!(same(&z[1], &out[1]) && same(&z_all[1], &out[1]));
    let plain = llm().generate_requests(batch(None));
    assert!(!same(&plain[1], &out[1]));
    // One head alone is a different intervention.
    let one = llm().generate_requests(batch(Some(vec![ablate(HookName::block(2, Site::Z), Some(vec![3]))])));
    assert!(!same(&one[1], &out[1]));
}

#[test]
fn bad_steers_are_refused_at_admission() {
    let mut llm = llm();
    let cases = [
        (add(HookName::block(3, Site::ResidPost), vec![1.0; 10], 1.0, SteerPositions::All), "needs 64"),
        (add(HookName::block(3, Site::Pattern), vec![], 1.0, SteerPositions::All), "cannot be steered"),
        (SteerSpec { hook: HookName::block(1, Site::Z), op: SteerOp::Ablate, positions: SteerPositions::All, heads: Some(vec![8]) }, "head 8 does not exist"),
        (SteerSpec { hook: HookName::block(1, Site::ResidPost), op: SteerOp::Ablate, positions: SteerPositions::All, heads: Some(vec![0]) }, "head-shaped"),
        (add(HookName::block(3, Site::ResidPost), vec![f32::NAN; 64], 1.0, SteerPositions::All), "non-finite"),
        (add(HookName::block(9, Site::ResidPost), vec![0.0; 64], 1.0, SteerPositions::All), "no hook point"),
    ];
    for (steer, msg) in cases {
        let out = llm.generate_requests(vec![request("Once", 1, vec![steer])]);
        match &out[0].outputs[0].finish_reason {
            Some(FinishReason::Error(m)) => assert!(m.contains(msg), "{m} lacks {msg}"),
            other => panic!("expected an error with {msg}, got {other:?}"),
        }
    }
}

#[test]
fn chosen_experts_cannot_be_steered() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../model/tests/data/tiny/mixtral/hf");
    let m = std::sync::Arc::new(glassbox_model::load(&glassbox_model::ModelSource::HfDir(dir), Default::default()).unwrap());
    let mut llm = LLM::from_model(m, Default::default()).unwrap();
    let steer = SteerSpec { hook: HookName::block(0, Site::ExpertIds), op: SteerOp::Ablate, positions: SteerPositions::All, heads: None };
    let req = EngineRequest { prompt: vec![5, 6, 7], sampling: SamplingParams { max_tokens: 2, ..Default::default() }, steer: vec![steer], ..Default::default() };
    let out = llm.generate_requests(vec![req]);
    match &out[0].outputs[0].finish_reason {
        Some(FinishReason::Error(m)) => assert!(m.contains("cannot be steered") && m.contains("hook_router_logits"), "{m}"),
        other => panic!("expected an error, got {other:?}"),
    }
}
