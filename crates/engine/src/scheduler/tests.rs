//! Scheduler scripts: arrivals and aborts in, the schedule of every step out.
//!
//! Script lines: `config blocks=N block_size=B budget=T seqs=S`, `add NAME FROM..TO max=M`
//! (prompt tokens FROM..TO, M tokens to generate), `add NAME ... after=LEADER` (an `n` > 1
//! follower), `nocache NAME`, `step`, `run` (step until idle), `abort NAME`.
//! A fake model appends one token whenever a sequence has computed all its tokens.

use super::*;
use crate::block::BlockPool;

struct Sim {
    sched: Scheduler,
    names: Vec<String>,
    max: HashMap<SeqId, usize>,
    log: String,
    steps: usize,
}

impl Sim {
    fn id(&self, name: &str) -> SeqId {
        self.names.iter().position(|n| n == name).unwrap_or_else(|| panic!("unknown {name}")) as SeqId
    }

    fn step(&mut self) {
        self.steps += 1;
        let out = self.sched.schedule();
        let mut line = format!("#{}", self.steps);
        for s in &out.scheduled {
            line += &format!(" {}[{}..{}]", self.names[s.id as usize], s.start, s.start + s.len);
        }
        for p in &out.preempted {
            line += &format!(" preempt:{}", self.names[*p as usize]);
        }
        for f in &out.failed {
            // The engine answers these with an error and removes them.
            self.sched.remove(*f);
            line += &format!(" failed:{}", self.names[*f as usize]);
        }
        for s in &out.scheduled {
            let seq = &self.sched.seqs[&s.id];
            if s.start == seq.cached_tokens && seq.cached_tokens > 0 && seq.preemptions == 0 && seq.num_computed == s.start {
                line += &format!(" cached:{}={}", self.names[s.id as usize], seq.cached_tokens);
            }
        }
        let mut done = vec![];
        for s in &out.scheduled {
            self.sched.computed(s.id, s.len);
            let seq = &self.sched.seqs[&s.id];
            if seq.num_computed == seq.tokens.len() {
                let generated = seq.tokens.len() - seq.prompt_len + 1;
                if generated >= self.max[&s.id] {
                    done.push(s.id);
                } else {
                    self.sched.append_token(s.id, 1000 + generated as u32);
                }
            }
        }
        for id in done {
            self.sched.remove(id);
            line += &format!(" done:{}", self.names[id as usize]);
        }
        line += &format!(" | free {}", self.sched.pool.num_free());
        self.log += &line;
        self.log.push('\n');
    }
}

fn check(script: &str, expect: &str) {
    let mut sim: Option<Sim> = None;
    for line in script.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let words: Vec<&str> = line.split_whitespace().collect();
        let arg = |k: &str| words.iter().find_map(|w| w.strip_prefix(&format!("{k}="))).map(|v| v.parse::<usize>().unwrap());
        match words[0] {
            "config" => {
                let pool = BlockPool::new(arg("blocks").unwrap(), arg("block_size").unwrap());
                let cfg = SchedulerConfig { max_num_batched_tokens: arg("budget").unwrap(), max_num_seqs: arg("seqs").unwrap() };
                sim = Some(Sim { sched: Scheduler::new(cfg, pool), names: vec![], max: HashMap::new(), log: String::new(), steps: 0 });
            }
            "add" => {
                let s = sim.as_mut().unwrap();
                let (a, b) = words[2].split_once("..").unwrap();
                let tokens: Vec<u32> = (a.parse().unwrap()..b.parse().unwrap()).collect();
                let id = s.names.len() as SeqId;
                s.names.push(words[1].to_string());
                s.max.insert(id, arg("max").unwrap_or(1));
                let leader = words.iter().find_map(|w| w.strip_prefix("after=")).map(|n| s.id(n));
                s.sched.add(id, SeqState::new(tokens, 0, !words.contains(&"nocache"), leader));
            }
            "step" => sim.as_mut().unwrap().step(),
            "run" => {
                let s = sim.as_mut().unwrap();
                while s.sched.has_work() && s.steps < 100 {
                    s.step();
                }
            }
            "abort" => {
                let s = sim.as_mut().unwrap();
                let id = s.id(words[1]);
                s.sched.remove(id);
                s.log += &format!("abort {}\n", words[1]);
            }
            other => panic!("unknown script command {other}"),
        }
    }
    let s = sim.unwrap();
    assert_eq!(s.log.trim(), expect.trim(), "\nschedule was:\n{}", s.log);
    // Whatever happened, once every sequence is gone every block is free again.
    if !s.sched.has_work() {
        assert_eq!(s.sched.pool.num_free(), s.sched.pool.num_blocks(), "blocks leaked");
    }
}

#[test]
fn prefill_then_decode_batched() {
    check(
        "config blocks=16 block_size=4 budget=32 seqs=8
         add A 0..6 max=3
         add B 100..103 max=2
         run",
        &lines(
            "#1 A[0..6] B[0..3] | free 13
             #2 A[6..7] B[3..4] done:B | free 14
             #3 A[7..8] done:A | free 16",
        ),
    );
}

fn lines(s: &str) -> String {
    s.lines().map(str::trim).collect::<Vec<_>>().join("\n")
}

#[test]
fn chunked_prefill_under_token_budget() {
    check(
        "config blocks=16 block_size=4 budget=5 seqs=8
         add A 0..12 max=2
         add B 100..104 max=1
         run",
        &lines(
            "#1 A[0..5] | free 14
             #2 A[5..10] | free 13
             #3 A[10..12] B[0..3] | free 12
             #4 A[12..13] B[3..4] done:A done:B | free 16",
        ),
    );
}

#[test]
fn sequence_limit() {
    check(
        "config blocks=16 block_size=4 budget=64 seqs=1
         add A 0..3 max=2
         add B 10..13 max=1
         run",
        &lines(
            "#1 A[0..3] | free 15
             #2 A[3..4] done:A | free 16
             #3 B[0..3] done:B | free 16",
        ),
    );
}

#[test]
fn preemption_under_tiny_kv_budget() {
    // 3 blocks of 2 tokens: A and B cannot both grow; B (newer) is preempted, cannot come
    // back while A holds the blocks, and is recomputed after A finishes (its cached block was
    // evicted by A's growth, so from scratch).
    check(
        "config blocks=3 block_size=2 budget=64 seqs=8
         add A 0..2 max=4
         add B 10..12 max=2
         run",
        &lines(
            "#1 A[0..2] B[0..2] | free 1
             #2 A[2..3] preempt:B | free 1
             #3 A[3..4] | free 1
             #4 A[4..5] done:A | free 3
             #5 B[0..3] done:B | free 3",
        ),
    );
}

#[test]
fn prefix_cache_hits_for_shared_prompt() {
    // B shares A's first two full blocks; one token is always recomputed for logits.
    check(
        "config blocks=16 block_size=4 budget=64 seqs=8
         add A 0..9 max=1
         step
         add B 0..10 max=1
         add C 0..8 max=1
         run",
        &lines(
            "#1 A[0..9] done:A | free 16
             #2 B[8..10] C[4..8] cached:B=8 cached:C=4 done:B done:C | free 16",
        ),
    );
}

#[test]
fn capture_requests_skip_the_prefix_cache() {
    check(
        "config blocks=16 block_size=4 budget=64 seqs=8
         add A 0..9 max=1
         step
         add B 0..9 max=1 nocache
         run",
        &lines(
            "#1 A[0..9] done:A | free 16
             #2 B[0..9] done:B | free 16",
        ),
    );
}

#[test]
fn n_followers_wait_for_the_leader_prompt() {
    check(
        "config blocks=16 block_size=4 budget=64 seqs=8
         add A 0..9 max=2
         add A2 0..9 max=2 after=A
         run",
        &lines(
            "#1 A[0..9] | free 13
             #2 A[9..10] A2[8..9] cached:A2=8 done:A | free 13
             #3 A2[9..10] done:A2 | free 16",
        ),
    );
}

#[test]
fn abort_mid_prefill_and_mid_decode() {
    check(
        "config blocks=16 block_size=4 budget=4 seqs=8
         add A 0..10 max=5
         add B 50..52 max=5
         step
         abort A
         step
         step
         abort B
         add C 0..3 max=1
         run",
        &lines(
            "#1 A[0..4] | free 15
             abort A
             #2 B[0..2] | free 15
             #3 B[2..3] | free 15
             abort B
             #4 C[0..3] done:C | free 16",
        ),
    );
}

#[test]
fn a_lone_sequence_that_outgrows_the_cache_fails_and_the_queue_moves_on() {
    // 2 blocks of 2 tokens: A would need a third block to go on. Before, it preempted itself
    // and could never be readmitted, and B waited behind it forever.
    check(
        "config blocks=2 block_size=2 budget=64 seqs=1
         add A 0..3 max=10
         add B 10..12 max=2
         run",
        &lines(
            "#1 A[0..3] | free 0
             #2 A[3..4] | free 0
             #3 B[0..2] failed:A | free 1
             #4 B[2..3] done:B | free 2",
        ),
    );
}

#[test]
fn a_prompt_larger_than_the_whole_cache_fails_at_admission() {
    check(
        "config blocks=2 block_size=2 budget=64 seqs=8
         add A 0..9 max=1
         add B 10..12 max=1
         run",
        &lines(
            "#1 B[0..2] failed:A done:B | free 2",
        ),
    );
}
