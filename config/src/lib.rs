//! kvmesh's configuration model (docs/configuration.md): the values the
//! filter's JSON, `kv-sidecar serve`'s YAML, the relay's flags and the test
//! harness share, defined once so their names, defaults and validation cannot
//! drift apart. No I/O: the filter builds it for `wasm32-wasip1`.

mod block_size;
pub mod data_parallel;
mod enums;
mod error;
mod limits;
mod model;
mod split;

pub use block_size::{BlockSize, BlockSizeError};
pub use enums::{DisaggregationPolicy, EngineKind, Role, UnknownValue};
pub use error::{FieldError, Invalid, Problem};
pub use limits::{check_index_entries, DEFAULT_MAX_INDEX_ENTRIES, MAX_INDEX_ENTRIES};
pub use model::{validate_models, CostWeights, DisaggregationSpec, ModelSpec, NoLocalFields};
pub use split::WithLocal;
