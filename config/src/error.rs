use thiserror::Error;

use crate::block_size::BlockSizeError;

/// What is wrong with one field's value.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum Problem {
    #[error("must not be empty")]
    Empty,
    #[error("must be at least 1")]
    Zero,
    #[error("is listed twice")]
    Duplicate,
    #[error("must be a finite number >= 0")]
    NotFiniteOrNegative,
    #[error("must be between 1 and {max}, got {value}")]
    OutOfRange { value: u64, max: u64 },
    #[error(transparent)]
    BlockSize(#[from] BlockSizeError),
    #[error("'{0}' is not an ip:port address")]
    NotAnAddress(String),
    #[error("must be a non-empty ASCII cluster name")]
    ClusterName,
    /// A check specific to one program (files, NATS settings).
    #[error("{0}")]
    Other(String),
}

/// One problem with one field, named by its path (`models[0].block_size`).
#[derive(Debug, Clone, PartialEq, Error)]
#[error("{field}: {problem}")]
pub struct FieldError {
    pub field: String,
    pub problem: Problem,
}

impl FieldError {
    pub fn new(field: impl Into<String>, problem: Problem) -> Self {
        Self {
            field: field.into(),
            problem,
        }
    }
}

/// Every problem of a configuration, one a line: fixing a config should take
/// one round.
#[derive(Debug, Clone, PartialEq, Error)]
#[error("{}", join_lines(.0))]
pub struct Invalid(pub Vec<FieldError>);

fn join_lines(errors: &[FieldError]) -> String {
    errors
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("\n")
}

impl Invalid {
    /// `Ok(value)` when `errors` is empty.
    pub fn check<T>(value: T, errors: Vec<FieldError>) -> Result<T, Invalid> {
        if errors.is_empty() {
            Ok(value)
        } else {
            Err(Invalid(errors))
        }
    }
}
