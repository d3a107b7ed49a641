//! A zero-copy MessagePack reader over a byte slice, just wide enough for the
//! engines' KV event batches.
//!
//! Written instead of building a generic value tree because the relay decodes
//! millions of token ids per second, and because every length in the input is
//! untrusted: nothing here allocates from a claimed length or recurses on
//! nesting depth.

use super::DecodeError;

/// A msgpack integer: engines send block hashes as either sign.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Int {
    Unsigned(u64),
    Signed(i64),
}

impl Int {
    /// Two's-complement bit pattern: SGLang's signed i64 hashes and vLLM's
    /// unsigned u64 hashes land on the same u64 space.
    pub(crate) fn bits(self) -> u64 {
        match self {
            Int::Unsigned(v) => v,
            Int::Signed(v) => v as u64,
        }
    }
}

#[derive(Debug)]
pub(crate) struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(buf: &'a [u8]) -> Self {
        Self { buf, pos: 0 }
    }

    pub(crate) fn is_at_end(&self) -> bool {
        self.pos >= self.buf.len()
    }

    /// Bytes left; an upper bound on how many values can still follow, used
    /// to cap allocations sized by claimed lengths.
    pub(crate) fn remaining(&self) -> usize {
        self.buf.len().saturating_sub(self.pos)
    }

    /// Where the next value starts, to come back to with [`Self::rewind`].
    pub(crate) fn position(&self) -> usize {
        self.pos
    }

    pub(crate) fn rewind(&mut self, position: usize) {
        self.pos = position.min(self.buf.len());
    }

    /// The encoded bytes of the next value, which is consumed.
    pub(crate) fn raw_value(&mut self) -> Result<&'a [u8], DecodeError> {
        let start = self.pos;
        self.skip()?;
        self.buf
            .get(start..self.pos)
            .ok_or(DecodeError::Truncated { offset: start })
    }

    pub(crate) fn peek(&self) -> Result<u8, DecodeError> {
        self.buf
            .get(self.pos)
            .copied()
            .ok_or(DecodeError::Truncated { offset: self.pos })
    }

    fn byte(&mut self) -> Result<u8, DecodeError> {
        let b = self.peek()?;
        self.pos += 1;
        Ok(b)
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|end| *end <= self.buf.len())
            .ok_or(DecodeError::Truncated { offset: self.pos })?;
        let bytes = &self.buf[self.pos..end];
        self.pos = end;
        Ok(bytes)
    }

    fn be<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    fn unexpected(&self, expected: &'static str, marker: u8) -> DecodeError {
        DecodeError::UnexpectedType {
            expected,
            marker,
            offset: self.pos,
        }
    }

    /// Consumes a nil if one is next.
    pub(crate) fn take_nil(&mut self) -> Result<bool, DecodeError> {
        if self.peek()? == 0xc0 {
            self.pos += 1;
            Ok(true)
        } else {
            Ok(false)
        }
    }

    pub(crate) fn array_len(&mut self) -> Result<usize, DecodeError> {
        let marker = self.peek()?;
        let len = match marker {
            0x90..=0x9f => {
                self.pos += 1;
                usize::from(marker & 0x0f)
            }
            0xdc => {
                self.pos += 1;
                usize::from(u16::from_be_bytes(self.be()?))
            }
            0xdd => {
                self.pos += 1;
                u32::from_be_bytes(self.be()?) as usize
            }
            _ => return Err(self.unexpected("array", marker)),
        };
        Ok(len)
    }

    pub(crate) fn map_len(&mut self) -> Result<usize, DecodeError> {
        let marker = self.peek()?;
        let len = match marker {
            0x80..=0x8f => {
                self.pos += 1;
                usize::from(marker & 0x0f)
            }
            0xde => {
                self.pos += 1;
                usize::from(u16::from_be_bytes(self.be()?))
            }
            0xdf => {
                self.pos += 1;
                u32::from_be_bytes(self.be()?) as usize
            }
            _ => return Err(self.unexpected("map", marker)),
        };
        Ok(len)
    }

    /// True when the next value is a map (newer vLLM event encoding).
    pub(crate) fn next_is_map(&self) -> Result<bool, DecodeError> {
        Ok(matches!(self.peek()?, 0x80..=0x8f | 0xde | 0xdf))
    }

    pub(crate) fn int(&mut self) -> Result<Int, DecodeError> {
        let marker = self.peek()?;
        let value = match marker {
            0x00..=0x7f => {
                self.pos += 1;
                Int::Unsigned(u64::from(marker))
            }
            0xe0..=0xff => {
                self.pos += 1;
                Int::Signed(i64::from(marker as i8))
            }
            0xcc => {
                self.pos += 1;
                Int::Unsigned(u64::from(self.byte()?))
            }
            0xcd => {
                self.pos += 1;
                Int::Unsigned(u64::from(u16::from_be_bytes(self.be()?)))
            }
            0xce => {
                self.pos += 1;
                Int::Unsigned(u64::from(u32::from_be_bytes(self.be()?)))
            }
            0xcf => {
                self.pos += 1;
                Int::Unsigned(u64::from_be_bytes(self.be()?))
            }
            0xd0 => {
                self.pos += 1;
                Int::Signed(i64::from(self.byte()? as i8))
            }
            0xd1 => {
                self.pos += 1;
                Int::Signed(i64::from(i16::from_be_bytes(self.be()?)))
            }
            0xd2 => {
                self.pos += 1;
                Int::Signed(i64::from(i32::from_be_bytes(self.be()?)))
            }
            0xd3 => {
                self.pos += 1;
                Int::Signed(i64::from_be_bytes(self.be()?))
            }
            _ => return Err(self.unexpected("integer", marker)),
        };
        Ok(value)
    }

    /// A token id: a non-negative integer that fits in u32.
    pub(crate) fn u32(&mut self) -> Result<u32, DecodeError> {
        let offset = self.pos;
        let out_of_range = DecodeError::OutOfRange {
            what: "u32",
            offset,
        };
        match self.int()? {
            Int::Unsigned(v) => u32::try_from(v).map_err(|_| out_of_range),
            Int::Signed(v) => u32::try_from(v).map_err(|_| out_of_range),
        }
    }

    pub(crate) fn i64(&mut self) -> Result<i64, DecodeError> {
        let offset = self.pos;
        match self.int()? {
            Int::Signed(v) => Ok(v),
            Int::Unsigned(v) => i64::try_from(v).map_err(|_| DecodeError::OutOfRange {
                what: "i64",
                offset,
            }),
        }
    }

    pub(crate) fn f64(&mut self) -> Result<f64, DecodeError> {
        let marker = self.peek()?;
        match marker {
            0xca => {
                self.pos += 1;
                Ok(f64::from(f32::from_be_bytes(self.be()?)))
            }
            0xcb => {
                self.pos += 1;
                Ok(f64::from_be_bytes(self.be()?))
            }
            _ => match self.int()? {
                Int::Unsigned(v) => Ok(v as f64),
                Int::Signed(v) => Ok(v as f64),
            },
        }
    }

    pub(crate) fn str(&mut self) -> Result<&'a str, DecodeError> {
        let offset = self.pos;
        let bytes = self.str_bytes()?;
        std::str::from_utf8(bytes).map_err(|_| DecodeError::InvalidUtf8 { offset })
    }

    fn str_bytes(&mut self) -> Result<&'a [u8], DecodeError> {
        let marker = self.peek()?;
        let len = match marker {
            0xa0..=0xbf => {
                self.pos += 1;
                usize::from(marker & 0x1f)
            }
            0xd9 => {
                self.pos += 1;
                usize::from(self.byte()?)
            }
            0xda => {
                self.pos += 1;
                usize::from(u16::from_be_bytes(self.be()?))
            }
            0xdb => {
                self.pos += 1;
                u32::from_be_bytes(self.be()?) as usize
            }
            _ => return Err(self.unexpected("string", marker)),
        };
        self.take(len)
    }

    /// A bin value, or a str taken as raw bytes.
    pub(crate) fn bytes(&mut self) -> Result<&'a [u8], DecodeError> {
        let marker = self.peek()?;
        let len = match marker {
            0xc4 => {
                self.pos += 1;
                usize::from(self.byte()?)
            }
            0xc5 => {
                self.pos += 1;
                usize::from(u16::from_be_bytes(self.be()?))
            }
            0xc6 => {
                self.pos += 1;
                u32::from_be_bytes(self.be()?) as usize
            }
            _ => return self.str_bytes(),
        };
        self.take(len)
    }

    /// True when the next value is a bin or str (a byte-string block hash).
    pub(crate) fn next_is_bytes(&self) -> Result<bool, DecodeError> {
        Ok(matches!(
            self.peek()?,
            0xc4..=0xc6 | 0xa0..=0xbf | 0xd9..=0xdb
        ))
    }

    pub(crate) fn next_is_array(&self) -> Result<bool, DecodeError> {
        Ok(matches!(self.peek()?, 0x90..=0x9f | 0xdc | 0xdd))
    }

    /// True when the next value is a str (not a bin).
    pub(crate) fn next_is_str(&self) -> Result<bool, DecodeError> {
        Ok(matches!(self.peek()?, 0xa0..=0xbf | 0xd9..=0xdb))
    }

    /// Skips one value of any type, iteratively so hostile nesting cannot
    /// overflow the stack.
    pub(crate) fn skip(&mut self) -> Result<(), DecodeError> {
        let mut pending: usize = 1;
        while pending > 0 {
            pending -= 1;
            let marker = self.byte()?;
            let (skip_bytes, children): (usize, usize) = match marker {
                0x00..=0x7f | 0xe0..=0xff | 0xc0 | 0xc2 | 0xc3 => (0, 0),
                0x80..=0x8f => (0, usize::from(marker & 0x0f) * 2),
                0x90..=0x9f => (0, usize::from(marker & 0x0f)),
                0xa0..=0xbf => (usize::from(marker & 0x1f), 0),
                0xc1 => return Err(self.unexpected("any value", marker)),
                0xc4 | 0xd9 => (usize::from(self.byte()?), 0),
                0xc5 | 0xda => (usize::from(u16::from_be_bytes(self.be()?)), 0),
                0xc6 | 0xdb => (u32::from_be_bytes(self.be()?) as usize, 0),
                0xc7 => (usize::from(self.byte()?) + 1, 0),
                0xc8 => (usize::from(u16::from_be_bytes(self.be()?)) + 1, 0),
                0xc9 => (
                    (u32::from_be_bytes(self.be()?) as usize).saturating_add(1),
                    0,
                ),
                0xca => (4, 0),
                0xcb => (8, 0),
                0xcc | 0xd0 => (1, 0),
                0xcd | 0xd1 => (2, 0),
                0xce | 0xd2 => (4, 0),
                0xcf | 0xd3 => (8, 0),
                0xd4 => (2, 0),
                0xd5 => (3, 0),
                0xd6 => (5, 0),
                0xd7 => (9, 0),
                0xd8 => (17, 0),
                0xdc => (0, usize::from(u16::from_be_bytes(self.be()?))),
                0xdd => (0, u32::from_be_bytes(self.be()?) as usize),
                0xde => (0, usize::from(u16::from_be_bytes(self.be()?)) * 2),
                0xdf => (
                    0,
                    (u32::from_be_bytes(self.be()?) as usize).saturating_mul(2),
                ),
            };
            self.take(skip_bytes)?;
            // Every child takes at least one byte: a claimed count beyond the
            // input is truncation, found now rather than after a long loop.
            if children > self.remaining() {
                return Err(DecodeError::Truncated { offset: self.pos });
            }
            pending += children;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn skip_handles_hostile_nesting_without_recursion() {
        let deep = vec![0x91u8; 100_000];
        let mut reader = Reader::new(&deep);
        assert!(matches!(reader.skip(), Err(DecodeError::Truncated { .. })));
    }

    #[test]
    fn huge_claimed_lengths_fail_fast() {
        let mut reader = Reader::new(&[0xdd, 0xff, 0xff, 0xff, 0xff]);
        assert!(reader.skip().is_err());
        let mut reader = Reader::new(&[0xc6, 0xff, 0xff, 0xff, 0xff, 1]);
        assert!(reader.bytes().is_err());
    }

    #[test]
    fn raw_values_and_rewinding() {
        // [["a", 1], "b"]
        let bytes = [0x92, 0x92, 0xa1, b'a', 0x01, 0xa1, b'b'];
        let mut reader = Reader::new(&bytes);
        assert_eq!(reader.array_len(), Ok(2));
        let start = reader.position();
        assert!(reader.next_is_array().unwrap_or(false));
        assert_eq!(reader.raw_value(), Ok(&bytes[1..5]));
        assert!(reader.next_is_str().unwrap_or(false));
        reader.rewind(start);
        assert_eq!(reader.raw_value(), Ok(&bytes[1..5]));
        assert_eq!(reader.str(), Ok("b"));
        assert!(reader.is_at_end());
    }

    #[test]
    fn ints_of_every_width() {
        let cases: &[(&[u8], Int)] = &[
            (&[0x05], Int::Unsigned(5)),
            (&[0xff], Int::Signed(-1)),
            (&[0xcc, 0xff], Int::Unsigned(255)),
            (
                &[0xcf, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xfe],
                Int::Unsigned(u64::MAX - 1),
            ),
            (&[0xd3, 0x80, 0, 0, 0, 0, 0, 0, 0], Int::Signed(i64::MIN)),
        ];
        for (bytes, want) in cases {
            assert_eq!(Reader::new(bytes).int().ok(), Some(*want));
        }
        assert_eq!(Int::Signed(-1).bits(), u64::MAX);
    }
}
