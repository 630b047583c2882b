//! Transports: the edges. They turn bytes into validated requests for the scheduler and its
//! responses back into bytes; they never touch the model.

pub mod mqtt;
pub mod serial;
pub mod wire;
