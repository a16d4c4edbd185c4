pub mod block;
pub mod scheduler;
