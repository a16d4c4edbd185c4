//! Running `EngineCore` on its own thread. Commands go in over a channel; each step's outputs
//! (plain data) go to a sink the caller supplies. No state is shared. The channel is unbounded
//! so that neither a submit nor an abort ever blocks the caller (an async runtime, say):
//! admission limits belong to the API layer, which answers overload with 503.

use crate::core::{panic_message, EngineCore};
use crate::stats::EngineStats;
use glassbox_protocol::{EngineOutput, EngineRequest, RequestId};
use std::path::PathBuf;
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::thread::JoinHandle;
use std::time::Duration;

/// Called with the path of a state dump, or why it could not be written.
pub type DumpReply = Box<dyn FnOnce(Result<PathBuf, String>) + Send>;

pub enum EngineCommand {
    Add(Box<EngineRequest>),
    Abort(RequestId),
    /// Write a dump of every request in flight without stopping (SIGQUIT, /debug/dump_state).
    DumpState(DumpReply),
    /// A live view of the engine (`/debug/requests`, `/debug/kv`, `/debug/steps`).
    Inspect(crate::core::Inspect, Box<dyn FnOnce(serde_json::Value) + Send>),
    /// Start a profile (`POST /start_profile`).
    StartProfile(crate::profile::ProfileOptions, Box<dyn FnOnce(Result<(), crate::core::ProfileError>) + Send>),
    /// Stop it and write its files (`POST /stop_profile`).
    StopProfile(Box<dyn FnOnce(Result<crate::profile::ProfileFiles, crate::core::ProfileError>) + Send>),
    /// The API side of an HTTP request, for the running profile (dropped when none runs).
    ApiTrace(Box<crate::profile::ApiTrace>),
    /// Start, change or stop tensor dumps; the reply says whether it worked.
    SetTensorDump(Option<crate::dump::DumpConfig>, Box<dyn FnOnce(Result<(), String>) + Send>),
    /// Abort everything still running and stop the thread.
    Shutdown,
}

pub struct EngineHandle {
    tx: Sender<EngineCommand>,
    thread: Option<JoinHandle<()>>,
}

#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    #[error("the engine has stopped")]
    Stopped,
}

impl EngineHandle {
    /// Start the engine thread. `sink` receives every step's outputs and a stats snapshot.
    pub fn spawn(mut core: EngineCore, mut sink: impl FnMut(Vec<EngineOutput>, EngineStats) + Send + 'static) -> std::io::Result<EngineHandle> {
        let (tx, rx) = channel::<EngineCommand>();
        let thread = std::thread::Builder::new().name("glassbox-engine".into()).spawn(move || run(&mut core, rx, &mut sink))?;
        Ok(EngineHandle { tx, thread: Some(thread) })
    }

    pub fn submit(&self, req: EngineRequest) -> Result<(), SubmitError> {
        self.tx.send(EngineCommand::Add(Box::new(req))).map_err(|_| SubmitError::Stopped)
    }

    pub fn abort(&self, id: RequestId) {
        let _ = self.tx.send(EngineCommand::Abort(id));
    }

    /// Send a control command (profiles, dumps) to the engine thread.
    pub fn control(&self, cmd: EngineCommand) -> Result<(), SubmitError> {
        self.tx.send(cmd).map_err(|_| SubmitError::Stopped)
    }

    /// Ask the thread to abort everything, answer it, and stop (without waiting).
    pub fn stop(&self) {
        let _ = self.tx.send(EngineCommand::Shutdown);
    }

    /// Abort what is still running, answer it, and stop the thread; waits for it.
    pub fn shutdown(&mut self) {
        let _ = self.tx.send(EngineCommand::Shutdown);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// How long a stalled engine (work it cannot schedule yet) waits for a command before it
/// looks again. It never spins.
const STALL_WAIT: Duration = Duration::from_millis(500);

fn run(core: &mut EngineCore, rx: Receiver<EngineCommand>, sink: &mut dyn FnMut(Vec<EngineOutput>, EngineStats)) {
    loop {
        // Block when there is nothing to do; wait (bounded) when the work cannot move.
        let first = if !core.has_work() {
            Some(rx.recv().unwrap_or(EngineCommand::Shutdown))
        } else if core.stalled() {
            match rx.recv_timeout(STALL_WAIT) {
                Ok(c) => Some(c),
                Err(RecvTimeoutError::Timeout) => None,
                Err(RecvTimeoutError::Disconnected) => Some(EngineCommand::Shutdown),
            }
        } else {
            rx.try_recv().ok()
        };
        let mut shutdown = false;
        for cmd in first.into_iter().chain(std::iter::from_fn(|| rx.try_recv().ok())) {
            match cmd {
                EngineCommand::Add(r) => core.add_request(*r),
                EngineCommand::Abort(id) => core.abort(id),
                EngineCommand::DumpState(reply) => {
                    let result = core.dump_state("on demand");
                    match &result {
                        Ok(p) => tracing::info!("engine state dumped to {}", p.display()),
                        Err(e) => tracing::error!("engine state dump failed: {e}"),
                    }
                    reply(result);
                }
                EngineCommand::SetTensorDump(cfg, reply) => reply(core.set_dump(cfg)),
                EngineCommand::StartProfile(opts, reply) => reply(core.start_profile(&opts)),
                EngineCommand::Inspect(what, reply) => reply(core.inspect(&what)),
                EngineCommand::StopProfile(reply) => reply(core.stop_profile()),
                EngineCommand::ApiTrace(t) => core.profile_api(&t),
                EngineCommand::Shutdown => shutdown = true,
            }
        }
        if shutdown {
            for id in core.request_ids() {
                core.abort(id);
            }
        }
        // A bug in a step must not take the server down, nor lose an answer: what the step
        // decided before the panic is kept, every request still in flight gets an error.
        let outputs = match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| core.step())) {
            Ok(o) => o,
            Err(panic) => core.recover(&panic_message(panic.as_ref())),
        };
        sink(outputs, core.stats());
        if shutdown {
            return;
        }
    }
}
