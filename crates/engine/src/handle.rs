//! Running `EngineCore` on its own thread. Commands go in over a channel; each step's outputs
//! (plain data) go to a sink the caller supplies. No state is shared. The channel is unbounded
//! so that neither a submit nor an abort ever blocks the caller (an async runtime, say):
//! admission limits belong to the API layer, which answers overload with 503.

use crate::core::{EngineCore, EngineStats};
use glassbox_protocol::{EngineOutput, EngineRequest, RequestId};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::thread::JoinHandle;

pub enum EngineCommand {
    Add(EngineRequest),
    Abort(RequestId),
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
        self.tx.send(EngineCommand::Add(req)).map_err(|_| SubmitError::Stopped)
    }

    pub fn abort(&self, id: RequestId) {
        let _ = self.tx.send(EngineCommand::Abort(id));
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

fn run(core: &mut EngineCore, rx: Receiver<EngineCommand>, sink: &mut dyn FnMut(Vec<EngineOutput>, EngineStats)) {
    loop {
        let first = if core.has_work() { rx.try_recv().ok() } else { rx.recv().ok().or(Some(EngineCommand::Shutdown)) };
        let mut shutdown = false;
        for cmd in first.into_iter().chain(std::iter::from_fn(|| rx.try_recv().ok())) {
            match cmd {
                EngineCommand::Add(r) => core.add_request(r),
                EngineCommand::Abort(id) => core.abort(id),
                EngineCommand::Shutdown => shutdown = true,
            }
        }
        if shutdown {
            for id in core.request_ids() {
                core.abort(id);
            }
        }
        // A bug in a step must not take the server down: fail the step's requests instead.
        let outputs = match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| core.step())) {
            Ok(o) => o,
            Err(panic) => {
                let msg = panic.downcast_ref::<String>().cloned().or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()));
                let msg = format!("internal error in the engine step: {}", msg.unwrap_or_default());
                tracing::error!("{msg}");
                let ids = core.request_ids();
                for &id in &ids {
                    core.abort(id);
                }
                // The error outputs answer these requests, not the abort notices.
                core.drain_pending();
                ids.into_iter().map(|id| EngineOutput::error(id, msg.clone())).collect()
            }
        };
        sink(outputs, core.stats());
        if shutdown {
            return;
        }
    }
}
