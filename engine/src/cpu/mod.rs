//! What the products and attention share about the CPU: the instruction set they run
//! ([`Isa`]) and the team of threads that splits one op ([`Team`]).

mod isa;
mod team;

pub use isa::Isa;
#[cfg(test)]
pub(crate) use isa::tested_isas;
pub use team::{Team, part_of, split_rows};
