use crate::error::{FieldError, Problem};

/// Default bound on (block, worker) entries of one model's prefix index, in
/// the sidecar and in every filter VM's replica of it alike: a replica that
/// holds less than the sidecar would route on a different index than the
/// sidecar's `/debug/route` reports.
pub const DEFAULT_MAX_INDEX_ENTRIES: usize = 4_000_000;

/// Largest bound accepted. An entry costs about 64 bytes in a filter VM's
/// 32-bit linear memory, so 16M entries take 1 GiB, a quarter of what a VM
/// can address, and every Envoy worker thread holds its own replica.
pub const MAX_INDEX_ENTRIES: usize = 16_000_000;

/// Checks a `max_index_entries` setting, named `field` in the error.
pub fn check_index_entries(field: &str, value: usize) -> Option<FieldError> {
    (!(1..=MAX_INDEX_ENTRIES).contains(&value)).then(|| {
        FieldError::new(
            field,
            Problem::OutOfRange {
                value: value as u64,
                max: MAX_INDEX_ENTRIES as u64,
            },
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_entries_bounds() {
        assert_eq!(check_index_entries("x", DEFAULT_MAX_INDEX_ENTRIES), None);
        assert_eq!(check_index_entries("x", MAX_INDEX_ENTRIES), None);
        assert_eq!(
            check_index_entries("state.max_index_entries", 0)
                .unwrap()
                .to_string(),
            "state.max_index_entries: must be between 1 and 16000000, got 0"
        );
        assert!(check_index_entries("x", MAX_INDEX_ENTRIES + 1).is_some());
    }
}
