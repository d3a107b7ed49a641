use std::fmt;
use std::num::NonZeroU32;
use std::str::FromStr;

use thiserror::Error;

/// Number of tokens in one KV block; must equal the engine's block size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BlockSize(NonZeroU32);

#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum BlockSizeError {
    #[error("must be at least 1")]
    Zero,
    #[error("{0} exceeds the maximum of {max}", max = BlockSize::MAX)]
    TooLarge(u32),
    #[error("'{0}' is not a whole number")]
    NotANumber(String),
}

impl BlockSize {
    /// Largest block size accepted; engines use 1..=256 in practice.
    pub const MAX: u32 = 4096;
    /// vLLM's default KV block size, and the default of every kvmesh config.
    pub const VLLM_DEFAULT: BlockSize = BlockSize(NonZeroU32::MIN.saturating_add(15));

    pub fn new(tokens: u32) -> Result<Self, BlockSizeError> {
        let size = NonZeroU32::new(tokens).ok_or(BlockSizeError::Zero)?;
        if tokens > Self::MAX {
            return Err(BlockSizeError::TooLarge(tokens));
        }
        Ok(Self(size))
    }

    pub fn get(self) -> u32 {
        self.0.get()
    }

    /// `usize` view for slicing; lossless because `MAX` fits in 32 bits.
    pub fn as_usize(self) -> usize {
        self.0.get() as usize
    }

    /// Number of full blocks in `tokens` tokens.
    pub fn full_blocks(self, tokens: usize) -> usize {
        tokens / self.as_usize()
    }
}

impl Default for BlockSize {
    fn default() -> Self {
        Self::VLLM_DEFAULT
    }
}

impl fmt::Display for BlockSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// For command-line flags (`--block-size`).
impl FromStr for BlockSize {
    type Err = BlockSizeError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let tokens = text
            .trim()
            .parse()
            .map_err(|_| BlockSizeError::NotANumber(text.to_owned()))?;
        Self::new(tokens)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_and_parsing() {
        assert_eq!(BlockSize::new(0), Err(BlockSizeError::Zero));
        assert_eq!(BlockSize::new(5000), Err(BlockSizeError::TooLarge(5000)));
        assert_eq!(BlockSize::new(4096).map(BlockSize::get), Ok(4096));
        assert_eq!(BlockSize::default().get(), 16);
        assert_eq!("32".parse::<BlockSize>().map(BlockSize::get), Ok(32));
        assert_eq!(
            "x".parse::<BlockSize>(),
            Err(BlockSizeError::NotANumber("x".into()))
        );
        assert_eq!("0".parse::<BlockSize>(), Err(BlockSizeError::Zero));
        assert_eq!(BlockSize::VLLM_DEFAULT.to_string(), "16");
        assert_eq!(BlockSize::VLLM_DEFAULT.full_blocks(33), 2);
    }
}
