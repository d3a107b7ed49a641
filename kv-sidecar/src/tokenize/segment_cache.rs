//! Token ids of recently seen text segments, least recently used out first,
//! bounded in entries and in bytes. Bytes matter: a segment is a whole
//! message (a pasted document, a long system prompt), and 4,096 cached
//! megabyte-sized segments, a text each plus its ids, would hold gigabytes.

use std::mem::size_of;
use std::sync::Arc;

use lru::LruCache;

/// How much the cache may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheLimits {
    pub entries: usize,
    /// Texts plus their ids. A segment costing more than this is not kept.
    pub bytes: usize,
}

impl Default for CacheLimits {
    fn default() -> Self {
        Self {
            entries: 4_096,
            bytes: 64 << 20,
        }
    }
}

pub struct SegmentCache {
    lru: LruCache<String, Arc<[u32]>>,
    limits: CacheLimits,
    bytes: usize,
}

impl SegmentCache {
    pub fn new(limits: CacheLimits) -> Self {
        Self {
            lru: LruCache::unbounded(),
            limits,
            bytes: 0,
        }
    }

    pub fn get(&mut self, segment: &str) -> Option<Arc<[u32]>> {
        self.lru.get(segment).cloned()
    }

    /// Keeps `ids` for `segment`, evicting the least recently used until
    /// both limits hold again.
    pub fn put(&mut self, segment: &str, ids: Arc<[u32]>) {
        let added = cost(segment, &ids);
        if added > self.limits.bytes || self.limits.entries == 0 {
            return;
        }
        if let Some(old) = self.lru.put(segment.to_owned(), ids) {
            self.bytes = self.bytes.saturating_sub(cost(segment, &old));
        }
        self.bytes += added;
        while self.bytes > self.limits.bytes || self.lru.len() > self.limits.entries {
            let Some((text, ids)) = self.lru.pop_lru() else {
                break;
            };
            self.bytes = self.bytes.saturating_sub(cost(&text, &ids));
        }
    }

    /// Bytes held, as the limit counts them.
    #[cfg(test)]
    fn bytes(&self) -> usize {
        self.bytes
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.lru.len()
    }
}

fn cost(segment: &str, ids: &[u32]) -> usize {
    segment.len() + size_of_val(ids) + size_of::<(String, Arc<[u32]>)>()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(n: u32) -> Arc<[u32]> {
        (0..n).collect()
    }

    #[test]
    fn bytes_and_entries_are_both_bounded() {
        let per_entry = size_of::<(String, Arc<[u32]>)>();
        let one = 1_000 + 4 * 250 + per_entry;
        let mut cache = SegmentCache::new(CacheLimits {
            entries: 10,
            bytes: 3 * one,
        });
        for i in 0..5 {
            cache.put(&format!("{i:0>1000}"), ids(250));
        }
        assert_eq!((cache.len(), cache.bytes()), (3, 3 * one));
        assert!(cache.get(&format!("{:0>1000}", 1)).is_none(), "oldest out");
        assert!(cache.get(&format!("{:0>1000}", 4)).is_some());
        // Too large to keep at all: nothing else is evicted for it.
        cache.put(&"x".repeat(4 * one), ids(1));
        assert_eq!(cache.len(), 3);
        // Many small ones: the entry limit binds.
        for i in 0..20 {
            cache.put(&i.to_string(), ids(1));
        }
        assert_eq!(cache.len(), 10);
        // Replacing an entry counts it once.
        let before = cache.bytes();
        cache.put("19", ids(1));
        assert_eq!(cache.bytes(), before);
    }
}
