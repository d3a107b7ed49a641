//! The fleet benchmark behind `scripts/bench`: the same simulated fleet and
//! workload under each routing policy, one after the other.

pub mod bound;
pub mod cpu;
pub mod dynamo;
pub mod mooncake;
pub mod policy;
pub mod prompts;
pub mod report;
pub mod run;
pub mod scale;
pub mod summary;
pub mod workload;
