//! Fault injection for tests: make one chosen request panic or fail in one phase of a step, so
//! the recovery paths (exactly one finishing output per request, blocks freed, crash dumps,
//! replay) are tested on the real engine.
//!
//! A plan can only come from `GLASSBOX_FAULT` in builds with the `fault-injection` feature
//! (test builds enable it); in any other build `FaultPlan::from_env` is always `None`, so no
//! client and no flag can reach it. The chosen request is the one whose sampling seed equals
//! the plan's seed: a property of the request, so a replay of a crash dump hits it again.

use serde::{Deserialize, Serialize};

/// Where in a step the fault strikes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    /// Preparing the sequence's share of the step (after scheduling, before the forward).
    Schedule,
    /// The batched forward pass (not attributable to one row by itself).
    Forward,
    Sample,
    Detokenize,
    /// A hook handler called for the request's rows during the forward pass.
    Hook,
    /// Engine code outside any one request's work (a bug in the step itself): not
    /// attributable, so every request in flight is answered with an error.
    Step,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FaultKind {
    Panic,
    Error,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FaultPlan {
    pub phase: Phase,
    pub kind: FaultKind,
    /// Requests with this sampling seed fail.
    pub seed: u64,
}

impl FaultPlan {
    /// `GLASSBOX_FAULT=PHASE:KIND:SEED` (e.g. `forward:panic:666`), in fault-injection builds.
    pub fn from_env() -> Option<FaultPlan> {
        #[cfg(feature = "fault-injection")]
        {
            let spec = std::env::var("GLASSBOX_FAULT").ok()?;
            match FaultPlan::parse(&spec) {
                Ok(p) => {
                    tracing::warn!("fault injection active: {spec}");
                    return Some(p);
                }
                Err(e) => {
                    tracing::error!("ignoring GLASSBOX_FAULT: {e}");
                    return None;
                }
            }
        }
        #[allow(unreachable_code)]
        None
    }

    pub fn parse(spec: &str) -> Result<FaultPlan, String> {
        let parts: Vec<&str> = spec.split(':').collect();
        let [phase, kind, seed] = parts[..] else {
            return Err(format!("`{spec}`: expected PHASE:KIND:SEED"));
        };
        let word = |w: &str| serde_json::Value::String(w.to_string());
        let phase = serde_json::from_value(word(phase)).map_err(|_| format!("unknown phase `{phase}` (schedule, forward, sample, detokenize, hook, step)"))?;
        let kind = serde_json::from_value(word(kind)).map_err(|_| format!("unknown kind `{kind}` (panic, error)"))?;
        let seed = seed.parse().map_err(|_| format!("bad seed `{seed}`"))?;
        Ok(FaultPlan { phase, kind, seed })
    }

    /// Does this plan target `phase` for a request with `seed`?
    pub fn targets(&self, phase: Phase, seed: Option<u64>) -> bool {
        self.phase == phase && seed == Some(self.seed)
    }

    /// Fail `request` as planned: panic, or an error.
    pub fn strike(&self, request: u64) -> Result<(), String> {
        let msg = format!("injected fault ({:?}, {:?}) in request {request}", self.phase, self.kind);
        match self.kind {
            FaultKind::Panic => panic!("{msg}"),
            FaultKind::Error => Err(msg),
        }
    }

    /// Strike if this plan targets `phase` and a request with `seed`.
    pub fn check(&self, phase: Phase, seed: Option<u64>, request: u64) -> Result<(), String> {
        if self.targets(phase, seed) {
            self.strike(request)
        } else {
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_plans() {
        assert_eq!(FaultPlan::parse("forward:panic:7"), Ok(FaultPlan { phase: Phase::Forward, kind: FaultKind::Panic, seed: 7 }));
        assert_eq!(FaultPlan::parse("hook:error:1").map(|p| p.phase), Ok(Phase::Hook));
        assert!(FaultPlan::parse("forward:panic").is_err());
        assert!(FaultPlan::parse("warp:panic:1").unwrap_err().contains("unknown phase"));
        let p = FaultPlan::parse("sample:error:5").unwrap();
        assert!(p.check(Phase::Sample, Some(4), 0).is_ok());
        assert!(p.check(Phase::Forward, Some(5), 0).is_ok());
        assert!(p.check(Phase::Sample, Some(5), 3).unwrap_err().contains("request 3"));
    }
}
