//! Fans each engine step's outputs out to the waiting handlers, by request id.
//!
//! The engine knows nothing of HTTP: it hands plain outputs to the sink; handlers register the
//! ids they wait for (before submitting, through the same FIFO, so no output can come first).

use glassbox_engine::EngineStats;
use glassbox_protocol::{EngineOutput, RequestId};
use std::collections::HashMap;
use tokio::sync::{mpsc, watch};

pub enum RouterMsg {
    /// Deliver the outputs of these ids (each finishing after `n` finished sequences) to `tx`.
    Register(Vec<RequestId>, usize, mpsc::UnboundedSender<EngineOutput>),
    Outputs(Vec<EngineOutput>, EngineStats),
    /// The engine thread has ended: nothing more will come for anyone.
    EngineStopped,
}

pub async fn run(mut rx: mpsc::UnboundedReceiver<RouterMsg>, stats: watch::Sender<EngineStats>) {
    // id -> (sender, sequences still running)
    let mut routes: HashMap<RequestId, (mpsc::UnboundedSender<EngineOutput>, usize)> = HashMap::new();
    while let Some(msg) = rx.recv().await {
        match msg {
            RouterMsg::Register(ids, n, tx) => {
                for id in ids {
                    routes.insert(id, (tx.clone(), n));
                }
            }
            RouterMsg::Outputs(outputs, snapshot) => {
                for out in outputs {
                    let id = out.id;
                    let Some((tx, left)) = routes.get_mut(&id) else { continue };
                    if out.finish.is_some() {
                        *left = left.saturating_sub(1);
                    }
                    // A rejected request (error before it ran) ends all its sequences at once.
                    let rejected = matches!(out.finish, Some(glassbox_protocol::FinishReason::Error(_))) && out.prompt_tokens == 0;
                    let done = *left == 0 || rejected;
                    // A closed receiver means the client left; the handler's guard aborts.
                    let _ = tx.send(out);
                    if done {
                        routes.remove(&id);
                    }
                }
                let _ = stats.send(snapshot);
            }
            RouterMsg::EngineStopped => {
                // Dropping the senders ends every waiting handler with "the engine stopped".
                routes.clear();
            }
        }
    }
}
