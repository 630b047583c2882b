//! Accelerator telemetry and power/thermal policy (see README.md; the work of a later issue).
