//! Approximate mode: prefix affinity learned from this VM's own routing
//! decisions, for when exact block hashes or fleet state are missing (no
//! sidecar, a stale one, or a tokenization that did not answer in time).
//!
//! A prompt becomes a chain of keys, each standing for everything before it:
//! every fourth block hash of a token-id prompt, or hashes of 256-byte chunks
//! of the raw text of a text or chat prompt (the filter has no tokenizer).
//! Every routed request records its keys against the worker it went to; the
//! longest run of a later prompt's leading keys recorded for one worker
//! estimates how much of the prompt that worker holds. This is how the
//! approximate prefix scorers of the Gateway API inference extension work.
//! It is an estimate: the engine may have evicted the blocks since, which the
//! entries' time to live bounds.

use std::collections::HashMap;
use std::num::NonZeroUsize;
use std::sync::Arc;

use lru::LruCache;

/// Workers remembered per key: a hot prefix spreads over a few workers.
const HOLDERS: usize = 4;
/// Distinct workers remembered before the table starts over.
const MAX_WORKERS: usize = 4096;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Holder {
    worker: u32,
    seen_ms: u64,
}

type Holders = [Option<Holder>; HOLDERS];

/// Which workers were recently sent which prompt prefixes, by this VM.
pub struct LearnedTable {
    entries: LruCache<u64, Holders>,
    ttl_ms: u64,
    /// Each worker's [`Target::key`](crate::Target::key), by number.
    workers: Vec<Arc<str>>,
    numbers: HashMap<Arc<str>, u32>,
    /// (worker, leading keys matched) of the last lookup.
    matched: Vec<(u32, u32)>,
}

impl LearnedTable {
    pub fn new(capacity: NonZeroUsize, ttl_ms: u64) -> Self {
        Self {
            entries: LruCache::new(capacity),
            ttl_ms,
            workers: Vec::new(),
            numbers: HashMap::new(),
            matched: Vec::new(),
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.entries.len()
    }

    /// For each worker that was sent the first keys of `keys`, how many
    /// leading keys in a row it was sent (only entries younger than the TTL).
    pub fn matches(&mut self, keys: &[u64], now_ms: u64) -> impl Iterator<Item = (&str, u32)> {
        self.matched.clear();
        for (position, key) in keys.iter().enumerate() {
            let position = u32::try_from(position).unwrap_or(u32::MAX);
            let Some(holders) = self.entries.get(key) else {
                break;
            };
            let mut extended = false;
            for holder in holders.iter().flatten() {
                if now_ms.saturating_sub(holder.seen_ms) > self.ttl_ms {
                    continue;
                }
                if position == 0 {
                    self.matched.push((holder.worker, 1));
                    extended = true;
                } else if let Some(run) = self
                    .matched
                    .iter_mut()
                    .find(|(worker, run)| *worker == holder.worker && *run == position)
                {
                    run.1 += 1;
                    extended = true;
                }
            }
            if !extended {
                break;
            }
        }
        let workers = &self.workers;
        self.matched.iter().filter_map(|(worker, run)| {
            let index = usize::try_from(*worker).ok()?;
            workers.get(index).map(|w| (&**w, *run))
        })
    }

    /// Remembers that `keys` were sent to `worker` (its
    /// [`Target::key`](crate::Target::key)) at `now_ms`.
    pub fn record(&mut self, keys: &[u64], worker: &str, now_ms: u64) {
        if keys.is_empty() {
            return;
        }
        let worker = self.number(worker);
        let seen = Holder {
            worker,
            seen_ms: now_ms,
        };
        for key in keys {
            let holders = self.entries.get_or_insert_mut(*key, || [None; HOLDERS]);
            let slot = match holders
                .iter()
                .position(|h| h.is_some_and(|h| h.worker == worker))
                .or_else(|| holders.iter().position(Option::is_none))
            {
                Some(slot) => slot,
                None => oldest(holders),
            };
            if let Some(holder) = holders.get_mut(slot) {
                *holder = Some(seen);
            }
        }
    }

    fn number(&mut self, worker: &str) -> u32 {
        if let Some(number) = self.numbers.get(worker) {
            return *number;
        }
        if self.workers.len() >= MAX_WORKERS {
            // Worker churn beyond any real pool: start over rather than grow.
            self.entries.clear();
            self.workers.clear();
            self.numbers.clear();
        }
        let number = u32::try_from(self.workers.len()).unwrap_or(u32::MAX);
        let worker: Arc<str> = Arc::from(worker);
        self.workers.push(Arc::clone(&worker));
        self.numbers.insert(worker, number);
        number
    }
}

fn oldest(holders: &Holders) -> usize {
    holders
        .iter()
        .enumerate()
        .min_by_key(|(_, h)| h.map_or(0, |h| h.seen_ms))
        .map_or(0, |(slot, _)| slot)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> LearnedTable {
        LearnedTable::new(NonZeroUsize::new(1000).unwrap(), 1_000)
    }

    fn matches(table: &mut LearnedTable, keys: &[u64], now: u64) -> Vec<(String, u32)> {
        let mut found: Vec<(String, u32)> = table
            .matches(keys, now)
            .map(|(a, n)| (a.to_owned(), n))
            .collect();
        found.sort();
        found
    }

    #[test]
    fn longest_leading_run_per_worker() {
        let mut table = table();
        table.record(&[1, 2, 3, 4], "a", 0);
        table.record(&[1, 2, 9], "b", 0);
        assert_eq!(
            matches(&mut table, &[1, 2, 3, 5], 10),
            [("a".to_owned(), 3), ("b".to_owned(), 2)]
        );
        // A run must start at the first key.
        assert!(matches(&mut table, &[5, 1, 2], 10).is_empty());
        // A worker's run ends at its first gap.
        table.record(&[7, 8], "c", 0);
        table.record(&[1, 8], "c", 0);
        assert_eq!(
            matches(&mut table, &[1, 2, 8], 10),
            [
                ("a".to_owned(), 2),
                ("b".to_owned(), 2),
                ("c".to_owned(), 1)
            ]
        );
    }

    #[test]
    fn old_entries_expire_and_the_oldest_holder_is_replaced() {
        let mut table = table();
        table.record(&[1], "a", 0);
        assert!(matches(&mut table, &[1], 2_000).is_empty());
        for (i, worker) in ["b", "c", "d", "e"].iter().enumerate() {
            table.record(&[1], worker, 100 + i as u64);
        }
        let holders: Vec<String> = matches(&mut table, &[1], 200)
            .into_iter()
            .map(|(a, _)| a)
            .collect();
        assert_eq!(holders, ["b", "c", "d", "e"]);
        table.record(&[1], "b", 300);
        table.record(&[1], "f", 301);
        let holders: Vec<String> = matches(&mut table, &[1], 400)
            .into_iter()
            .map(|(a, _)| a)
            .collect();
        assert_eq!(holders, ["b", "d", "e", "f"]);
    }

    #[test]
    fn capacity_bounds_the_table() {
        let mut table = LearnedTable::new(NonZeroUsize::new(8).unwrap(), 1_000);
        let keys: Vec<u64> = (0..100).collect();
        table.record(&keys, "a", 0);
        assert_eq!(table.len(), 8);
    }
}
