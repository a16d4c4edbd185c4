//! Captures returned with `"return": "url"`: held in memory until downloaded once
//! (`GET /v1/captures/{id}`) or until their time to live runs out, within a byte limit.
//! This is API-layer state (never the engine's); one short lock per put or take.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

pub struct CaptureStore {
    inner: Mutex<Inner>,
    pub limit: u64,
    pub ttl: Duration,
}

#[derive(Default)]
struct Inner {
    items: HashMap<String, (Vec<u8>, Instant)>,
    used: u64,
}

impl Inner {
    fn expire(&mut self, ttl: Duration) {
        let now = Instant::now();
        let used = &mut self.used;
        self.items.retain(|_, (bytes, at)| {
            let keep = now.duration_since(*at) < ttl;
            if !keep {
                *used -= bytes.len() as u64;
            }
            keep
        });
    }
}

impl CaptureStore {
    pub fn new(limit: u64, ttl: Duration) -> Self {
        CaptureStore { inner: Mutex::new(Inner::default()), limit, ttl }
    }

    /// Store `bytes`; returns the id, or why it does not fit.
    pub fn put(&self, bytes: Vec<u8>) -> Result<String, String> {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner.expire(self.ttl);
        let len = bytes.len() as u64;
        if inner.used + len > self.limit {
            return Err(format!(
                "the capture store is full ({} of {} bytes held, this capture needs {len}): download earlier captures, wait up to {} s for them to expire, or use \"return\": \"inline\"",
                inner.used,
                self.limit,
                self.ttl.as_secs()
            ));
        }
        let id = format!("cap-{:032x}", rand::random::<u128>());
        inner.used += len;
        inner.items.insert(id.clone(), (bytes, Instant::now()));
        Ok(id)
    }

    /// Take a capture out (it is deleted).
    pub fn take(&self, id: &str) -> Option<Vec<u8>> {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner.expire(self.ttl);
        let (bytes, _) = inner.items.remove(id)?;
        inner.used -= bytes.len() as u64;
        Some(bytes)
    }

    pub fn used(&self) -> u64 {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).used
    }
}
