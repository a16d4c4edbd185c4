//! Captures in the engine: exactly the promised positions, under preemption too; position
//! lists, element types, and the byte budget checked before any compute.

use glassbox_engine::{EngineConfig, KvMemory, LLM};
use glassbox_model::{load, LoadOptions, LoadedModel, ModelSource};
use glassbox_protocol::{Capture, CapturePositions, CaptureSpec, DType, FinishReason, HookName, SamplingParams, Site};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

fn stories() -> Arc<LoadedModel> {
    static M: OnceLock<Arc<LoadedModel>> = OnceLock::new();
    let dir: PathBuf = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/models/stories260K");
    M.get_or_init(|| Arc::new(load(&ModelSource::HfDir(dir), LoadOptions::default()).unwrap())).clone()
}

fn llm(kv_blocks: Option<usize>) -> LLM {
    let m = stories();
    let per_block = 2 * m.model.cfg.num_layers * 4 * m.model.cfg.num_kv_heads * m.model.cfg.head_dim * 4;
    let kv = kv_blocks.map_or(64 << 20, |b| (b * per_block) as u64);
    LLM::from_model(m, EngineConfig { kv_cache_memory: KvMemory::Bytes(kv), block_size: 4, ..Default::default() }).unwrap()
}

fn spec(positions: CapturePositions, dtype: DType) -> Option<CaptureSpec> {
    Some(CaptureSpec { hooks: vec![HookName::block(1, Site::ResidPost), HookName::block(0, Site::Pattern), HookName::global(Site::Logits)], positions, dtype })
}

fn prompts(m: &LoadedModel) -> Vec<Vec<u32>> {
    ["Once upon a time", "Lily and Tom went to the park. They", "The cat sat on the mat", "One day, a little bird flew"]
        .iter()
        .map(|t| m.tokenizer.encode(t, true).unwrap())
        .collect()
}

/// Run the four prompts with `positions`; captures per request.
fn run(llm: &mut LLM, positions: CapturePositions, dtype: DType) -> Vec<(Vec<u32>, Vec<Capture>)> {
    let m = stories();
    let params = SamplingParams { max_tokens: 24, ignore_eos: true, ..Default::default() };
    let reqs = prompts(&m).into_iter().map(|p| (p, params.clone(), spec(positions.clone(), dtype))).collect();
    llm.generate_tokens(reqs)
        .into_iter()
        .map(|r| {
            assert_eq!(r.outputs[0].finish_reason, Some(FinishReason::Length));
            (r.outputs[0].token_ids.clone(), r.outputs[0].captures.clone())
        })
        .collect()
}

#[test]
fn captures_survive_preemption_exactly() {
    // 14 blocks of 4 tokens for four sequences growing to ~35 tokens: preemption is certain.
    for positions in [CapturePositions::All, CapturePositions::Generated, CapturePositions::Last, CapturePositions::At(vec![0, 3, -1])] {
        let roomy = run(&mut llm(None), positions.clone(), DType::F32);
        let mut tight_llm = llm(Some(14));
        let tight = run(&mut tight_llm, positions.clone(), DType::F32);
        assert!(tight_llm.core().stats().preemptions > 0, "{positions:?}: no preemption happened");
        for (i, ((t1, c1), (t2, c2))) in roomy.iter().zip(&tight).enumerate() {
            assert_eq!(t1, t2, "{positions:?} request {i}: tokens");
            assert_eq!(c1, c2, "{positions:?} request {i}: captures differ under preemption");
        }
        // Exactly the promised positions, the same for every hook.
        let m = stories();
        for ((tokens, caps), prompt) in roomy.iter().zip(prompts(&m)) {
            let computed = prompt.len() + tokens.len() - 1; // the last sampled token is never fed in
            let expect: Vec<usize> = match &positions {
                CapturePositions::All => (0..computed).collect(),
                CapturePositions::Generated => (prompt.len()..computed).collect(),
                CapturePositions::Last => vec![computed - 1],
                CapturePositions::At(_) => vec![0, 3, computed - 1],
                CapturePositions::Prompt => unreachable!(),
            };
            for c in caps {
                // (A sequence that captures logits computes them for every row.)
                assert_eq!(c.positions, expect, "{positions:?} {}", c.hook);
                let rows = if c.hook.site == Site::Pattern { c.shape[1] } else { c.shape[0] };
                assert_eq!(rows, expect.len(), "{positions:?} {}: shape {:?}", c.hook, c.shape);
            }
        }
    }
}

#[test]
fn half_precision_captures_round_the_f32_values() {
    let full = run(&mut llm(None), CapturePositions::Last, DType::F32);
    for dtype in [DType::F16, DType::BF16] {
        let half = run(&mut llm(None), CapturePositions::Last, dtype);
        for ((_, a), (_, b)) in full.iter().zip(&half) {
            for (x, y) in a.iter().zip(b) {
                assert_eq!(y.dtype, dtype);
                assert_eq!(y.data.len(), x.data.len() / 2);
                let expect: Vec<f32> = x
                    .to_f32()
                    .iter()
                    .map(|&v| if dtype == DType::F16 { half::f16::from_f32(v).to_f32() } else { half::bf16::from_f32(v).to_f32() })
                    .collect();
                assert_eq!(y.to_f32(), expect, "{dtype:?} {}", x.hook);
            }
        }
    }
}

#[test]
fn an_oversized_capture_is_refused_before_any_compute() {
    let mut llm = llm(None);
    let budget = llm.core().limits().max_capture_bytes;
    let m = stories();
    let every_hook = m.model.hook_names();
    let params = SamplingParams { max_tokens: 400, n: 16, ..Default::default() };
    let capture = CaptureSpec { hooks: every_hook, positions: CapturePositions::All, dtype: DType::F32 };
    let need = llm.core().limits().capture_bytes(&capture, 5, 400, 16);
    assert!(need > budget, "the test needs a capture over the default budget ({need} <= {budget})");
    let out = llm.generate_tokens(vec![(prompts(&m)[0].clone(), params, Some(capture))]);
    match &out[0].outputs[0].finish_reason {
        Some(FinishReason::Error(msg)) => assert!(msg.contains("--max-capture-bytes") && msg.contains("MiB"), "{msg}"),
        other => panic!("expected an error, got {other:?}"),
    }
    assert_eq!(llm.core().stats().steps, 0, "nothing was computed");
}

#[test]
fn the_logit_lens_at_the_last_layer_ranks_as_the_logprobs() {
    use glassbox_protocol::{EngineRequest, LensSpec};
    let m = stories();
    let last = m.model.cfg.num_layers - 1;
    let prompt = prompts(&m)[1].clone();
    let sampling = SamplingParams { max_tokens: 12, logprobs: Some(5), ignore_eos: true, ..Default::default() };
    let lens = LensSpec { layers: (0..=last).collect(), top_k: 5, positions: CapturePositions::All };
    let out = llm(None).generate_requests(vec![EngineRequest { prompt: prompt.clone(), sampling, logit_lens: Some(lens), ..Default::default() }]);
    let c = &out[0].outputs[0];
    let computed = prompt.len() + c.token_ids.len() - 1;
    // Every layer at every computed position, ordered by position then layer.
    assert_eq!(c.logit_lens.len(), computed * (last + 1));
    assert!(c.logit_lens.windows(2).all(|w| (w[0].position, w[0].layer) < (w[1].position, w[1].layer)));
    // Position p's last-layer lens is the distribution token p+1 was sampled from.
    for (i, lp) in c.logprobs.iter().enumerate() {
        let pos = prompt.len() - 1 + i;
        let e = c.logit_lens.iter().find(|e| e.layer == last && e.position == pos).unwrap();
        let lens_ids: Vec<u32> = e.top.iter().map(|t| t.0).collect();
        let lp_ids: Vec<u32> = lp.top.iter().map(|t| t.0).collect();
        assert_eq!(lens_ids, lp_ids, "position {pos}");
        for ((_, p), (_, l)) in e.top.iter().zip(&lp.top) {
            assert!((p.ln() - l).abs() < 1e-4, "position {pos}: prob {p} vs logprob {l}");
        }
        assert_eq!(e.top[0].0, c.token_ids[i], "greedy picks the lens' top token");
    }
    // Earlier layers predict differently somewhere (the lens is not the same everywhere).
    assert!(c.logit_lens.iter().any(|e| e.layer == 0 && c.logit_lens.iter().any(|f| f.layer == last && f.position == e.position && f.top[0].0 != e.top[0].0)));
}

#[test]
fn a_tensor_dump_slices_into_each_requests_captures() {
    use glassbox_engine::dump::{slice, DumpConfig};
    let m = stories();
    let hooks = vec![HookName::global(Site::Embed), HookName::block(2, Site::Q), HookName::block(4, Site::ResidPost), HookName::global(Site::Logits)];
    let dir = std::env::temp_dir().join(format!("glassbox-dump-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let cfg = EngineConfig {
        kv_cache_memory: KvMemory::Bytes(64 << 20),
        block_size: 4,
        max_num_batched_tokens: 16, // prompts arrive in chunks: rows of a request span steps
        dump: Some(DumpConfig { dir: dir.clone(), hooks: hooks.clone(), skip_steps: 0, max_steps: None }),
        ..Default::default()
    };
    let mut llm = LLM::from_model(m.clone(), cfg).unwrap();
    let params = SamplingParams { max_tokens: 6, ignore_eos: true, ..Default::default() };
    let spec = CaptureSpec { hooks: hooks.clone(), positions: CapturePositions::All, dtype: DType::F32 };
    let out = llm.generate_tokens(prompts(&m).into_iter().map(|p| (p, params.clone(), Some(spec.clone()))).collect());
    drop(llm); // waits for the writer
    let steps = std::fs::read_dir(&dir).unwrap().filter(|e| e.as_ref().unwrap().path().extension().is_some_and(|x| x == "json")).count();
    assert!(steps >= 6, "{steps} steps dumped");
    for r in &out {
        let mut sliced = slice(&dir, r.id, 0).unwrap();
        let mut captured = r.outputs[0].captures.clone();
        sliced.sort_by_key(|c| c.hook);
        captured.sort_by_key(|c| c.hook);
        assert_eq!(sliced, captured, "request {}: the dump's rows differ from its captures", r.id);
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// A mixture of experts in the engine (tiny Mixtral, crates/model/tests/data/tiny): each
/// request's routing (router logits, chosen experts, their weights) is captured per token, the
/// same alone as inside a batch, and the chosen experts cannot be steered.
#[test]
fn moe_routing_is_captured_per_request_and_batch_invariant() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../model/tests/data/tiny/mixtral/hf");
    let m = Arc::new(load(&ModelSource::HfDir(dir), LoadOptions::default()).unwrap());
    let hooks = vec![HookName::block(1, Site::RouterLogits), HookName::block(1, Site::ExpertIds), HookName::block(1, Site::ExpertWeights)];
    let spec = Some(CaptureSpec { hooks, positions: CapturePositions::All, dtype: DType::F32 });
    let params = SamplingParams { max_tokens: 6, ignore_eos: true, ..Default::default() };
    let prompts: Vec<Vec<u32>> = ["Once upon a time", "The dog ran to the park", "def main():", "Paris"].iter().map(|t| m.tokenizer.encode(t, true).unwrap()).collect();
    let mut llm = LLM::from_model(m.clone(), EngineConfig::default()).unwrap();
    let batched = llm.generate_tokens(prompts.iter().map(|p| (p.clone(), params.clone(), spec.clone())).collect());
    for (i, p) in prompts.iter().enumerate() {
        let alone = llm.generate_tokens(vec![(p.clone(), params.clone(), spec.clone())]);
        assert_eq!(alone[0].outputs[0].token_ids, batched[i].outputs[0].token_ids, "request {i}: tokens");
        assert_eq!(alone[0].outputs[0].captures, batched[i].outputs[0].captures, "request {i}: routing differs in a batch");
        let caps = &batched[i].outputs[0].captures;
        let rows = p.len() + params.max_tokens - 1;
        assert_eq!(caps[0].shape, vec![rows, 4], "router logits: [T, experts]");
        assert_eq!(caps[1].shape, vec![rows, 2], "expert ids: [T, k]");
        for (ids, w) in caps[1].to_f32().chunks(2).zip(caps[2].to_f32().chunks(2)) {
            assert!(ids.iter().all(|&e| e.fract() == 0.0 && (0.0..4.0).contains(&e)) && ids[0] != ids[1], "{ids:?}");
            // Mixtral renormalizes the chosen experts' weights, best first.
            assert!((w[0] + w[1] - 1.0).abs() < 1e-5 && w[0] >= w[1], "{w:?}");
        }
    }
}
