//! Serial links (DESIGN.md section 5): the technician console and the framed device protocol.

pub mod frame;
pub mod line;
