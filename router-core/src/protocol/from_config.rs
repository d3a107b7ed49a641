//! The wire enums and the configuration's: a relay is configured with
//! `kvmesh_config::{EngineKind, Role}` and announces them as these. The wire
//! keeps `Unspecified` for relays that predate a field, which no config can
//! name; converting it back is an error that returns it.

use super::{EngineKind, WorkerRole};

/// `From` the config enum and `TryFrom` the wire enum, variant by variant.
macro_rules! same_variants {
    ($config:ty, $wire:ident { $($variant:ident),+ }) => {
        impl From<$config> for $wire {
            fn from(value: $config) -> Self {
                match value {
                    $(<$config>::$variant => Self::$variant,)+
                }
            }
        }

        impl TryFrom<$wire> for $config {
            type Error = $wire;

            fn try_from(value: $wire) -> Result<Self, $wire> {
                match value {
                    $($wire::$variant => Ok(Self::$variant),)+
                    $wire::Unspecified => Err(value),
                }
            }
        }
    };
}

same_variants!(
    kvmesh_config::EngineKind,
    EngineKind {
        Vllm,
        Sglang,
        Trtllm
    }
);
same_variants!(
    kvmesh_config::Role,
    WorkerRole {
        Prefill,
        Decode,
        Both
    }
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_config_value_round_trips_through_the_wire() {
        for &kind in kvmesh_config::EngineKind::ALL {
            let wire = EngineKind::from(kind);
            assert_eq!(kvmesh_config::EngineKind::try_from(wire), Ok(kind));
        }
        for &role in kvmesh_config::Role::ALL {
            let wire = WorkerRole::from(role);
            assert_eq!(kvmesh_config::Role::try_from(wire), Ok(role));
        }
        assert!(kvmesh_config::Role::try_from(WorkerRole::Unspecified).is_err());
        assert!(kvmesh_config::EngineKind::try_from(EngineKind::Unspecified).is_err());
    }
}
