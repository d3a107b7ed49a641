//! The workers one process hosts: `--workers N` and the per-worker flags,
//! which take one comma-separated value per worker, resolved into one
//! [`WorkerSlot`] each, with the checks clap cannot make.

use std::collections::HashSet;
use std::fmt::Display;

use thiserror::Error;

use crate::config::Config;

/// What sets one hosted worker apart from the others.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerSlot {
    pub worker_id: String,
    /// HTTP port (0: any free port).
    pub port: u16,
    pub kv_events_endpoint: Option<String>,
    pub kv_events_replay_endpoint: Option<String>,
    pub bootstrap_port: Option<u16>,
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum HostingError {
    #[error("--workers must be at least 1")]
    NoWorkers,
    #[error(
        "--{flag} has {given} value(s) for {workers} workers: give one per worker, comma-separated"
    )]
    ValueCount {
        flag: &'static str,
        given: usize,
        workers: usize,
    },
    #[error("--port {first} with --workers {workers} runs past port 65535")]
    PortsExhausted { first: u16, workers: usize },
    #[error("--{flag} gives {value} to more than one worker: each needs its own")]
    Repeated { flag: &'static str, value: String },
    #[error("--kv-events-replay-endpoint needs --kv-events-endpoint")]
    ReplayWithoutEvents,
}

/// One slot per `--workers`, in order.
pub fn worker_slots(config: &Config) -> Result<Vec<WorkerSlot>, HostingError> {
    let workers = config.workers;
    if workers == 0 {
        return Err(HostingError::NoWorkers);
    }
    let ports = ports(&config.port, workers)?;
    let worker_ids = if config.worker_id.is_empty() {
        (0..workers).map(|i| format!("sim-{i}")).collect()
    } else {
        exactly_one_each("worker-id", &config.worker_id, workers)?
    };
    let events = one_each_or_none("kv-events-endpoint", &config.kv_events_endpoint, workers)?;
    let replays = one_each_or_none(
        "kv-events-replay-endpoint",
        &config.kv_events_replay_endpoint,
        workers,
    )?;
    if config.kv_events_endpoint.is_empty() && !config.kv_events_replay_endpoint.is_empty() {
        return Err(HostingError::ReplayWithoutEvents);
    }
    let bootstraps = one_each_or_none(
        "disaggregation-bootstrap-port",
        &config.disaggregation_bootstrap_port,
        workers,
    )?;
    distinct("worker-id", &worker_ids)?;
    distinct("port", ports.iter().filter(|p| **p != 0))?;
    distinct("kv-events-endpoint", &config.kv_events_endpoint)?;
    distinct(
        "kv-events-replay-endpoint",
        &config.kv_events_replay_endpoint,
    )?;
    distinct(
        "disaggregation-bootstrap-port",
        config
            .disaggregation_bootstrap_port
            .iter()
            .filter(|p| **p != 0),
    )?;
    Ok(worker_ids
        .into_iter()
        .zip(ports)
        .zip(events)
        .zip(replays)
        .zip(bootstraps)
        .map(
            |(
                (((worker_id, port), kv_events_endpoint), kv_events_replay_endpoint),
                bootstrap_port,
            )| {
                WorkerSlot {
                    worker_id,
                    port,
                    kv_events_endpoint,
                    kv_events_replay_endpoint,
                    bootstrap_port,
                }
            },
        )
        .collect())
}

/// One port each, or a single first port counted up from (0 stays 0: every
/// worker takes any free port).
fn ports(given: &[u16], workers: usize) -> Result<Vec<u16>, HostingError> {
    match given {
        [0] => Ok(vec![0; workers]),
        [first] => (0..workers)
            .map(|i| {
                u16::try_from(usize::from(*first) + i).map_err(|_| HostingError::PortsExhausted {
                    first: *first,
                    workers,
                })
            })
            .collect(),
        _ => exactly_one_each("port", given, workers),
    }
}

fn exactly_one_each<T: Clone>(
    flag: &'static str,
    values: &[T],
    workers: usize,
) -> Result<Vec<T>, HostingError> {
    if values.len() == workers {
        Ok(values.to_vec())
    } else {
        Err(HostingError::ValueCount {
            flag,
            given: values.len(),
            workers,
        })
    }
}

/// No value (the feature is off for every worker) or one each.
fn one_each_or_none<T: Clone>(
    flag: &'static str,
    values: &[T],
    workers: usize,
) -> Result<Vec<Option<T>>, HostingError> {
    if values.is_empty() {
        return Ok(vec![None; workers]);
    }
    Ok(exactly_one_each(flag, values, workers)?
        .into_iter()
        .map(Some)
        .collect())
}

fn distinct<T: Display>(
    flag: &'static str,
    values: impl IntoIterator<Item = T>,
) -> Result<(), HostingError> {
    let mut seen = HashSet::new();
    for value in values {
        let value = value.to_string();
        if !seen.insert(value.clone()) {
            return Err(HostingError::Repeated { flag, value });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    fn slots(args: &[&str]) -> Result<Vec<WorkerSlot>, HostingError> {
        let config =
            Config::try_parse_from(std::iter::once("sim-engine").chain(args.iter().copied()))
                .expect("flags parse");
        worker_slots(&config)
    }

    fn slot(worker_id: &str, port: u16) -> WorkerSlot {
        WorkerSlot {
            worker_id: worker_id.to_owned(),
            port,
            kv_events_endpoint: None,
            kv_events_replay_endpoint: None,
            bootstrap_port: None,
        }
    }

    #[test]
    fn without_flags_one_worker_as_before() {
        assert_eq!(slots(&[]).unwrap(), vec![slot("sim-0", 8000)]);
    }

    #[test]
    fn one_worker_takes_single_values() {
        let got = slots(&[
            "--port",
            "8001",
            "--worker-id",
            "w0",
            "--kv-events-endpoint",
            "tcp://127.0.0.1:5557",
            "--kv-events-replay-endpoint",
            "tcp://127.0.0.1:5558",
            "--disaggregation-bootstrap-port",
            "8998",
        ])
        .unwrap();
        assert_eq!(
            got,
            vec![WorkerSlot {
                worker_id: "w0".into(),
                port: 8001,
                kv_events_endpoint: Some("tcp://127.0.0.1:5557".into()),
                kv_events_replay_endpoint: Some("tcp://127.0.0.1:5558".into()),
                bootstrap_port: Some(8998),
            }]
        );
    }

    #[test]
    fn one_port_counts_up_and_ids_default_per_worker() {
        assert_eq!(
            slots(&["--workers", "3", "--port", "9000"]).unwrap(),
            vec![
                slot("sim-0", 9000),
                slot("sim-1", 9001),
                slot("sim-2", 9002)
            ]
        );
        assert_eq!(
            slots(&["--workers", "2", "--port", "0"]).unwrap(),
            vec![slot("sim-0", 0), slot("sim-1", 0)]
        );
    }

    #[test]
    fn lists_are_matched_by_position() {
        let got = slots(&[
            "--workers",
            "2",
            "--port",
            "9100,9000",
            "--worker-id",
            "b,a",
            "--kv-events-endpoint",
            "tcp://127.0.0.1:1,tcp://127.0.0.1:2",
            "--kv-events-replay-endpoint",
            "tcp://127.0.0.1:3,tcp://127.0.0.1:4",
        ])
        .unwrap();
        let summary: Vec<_> = got
            .iter()
            .map(|s| {
                (
                    s.worker_id.as_str(),
                    s.port,
                    s.kv_events_endpoint.as_deref(),
                    s.kv_events_replay_endpoint.as_deref(),
                    s.bootstrap_port,
                )
            })
            .collect();
        assert_eq!(
            summary,
            vec![
                (
                    "b",
                    9100,
                    Some("tcp://127.0.0.1:1"),
                    Some("tcp://127.0.0.1:3"),
                    None
                ),
                (
                    "a",
                    9000,
                    Some("tcp://127.0.0.1:2"),
                    Some("tcp://127.0.0.1:4"),
                    None
                ),
            ]
        );
    }

    #[test]
    fn lists_of_the_wrong_length_are_refused() {
        let count = |flag, given| HostingError::ValueCount {
            flag,
            given,
            workers: 3,
        };
        let three = ["--workers", "3"];
        let with = |extra: &[&str]| slots(&[&three[..], extra].concat());
        assert_eq!(with(&["--port", "1,2"]), Err(count("port", 2)));
        assert_eq!(with(&["--worker-id", "a"]), Err(count("worker-id", 1)));
        assert_eq!(
            with(&[
                "--kv-events-endpoint",
                "tcp://h:1,tcp://h:2,tcp://h:3,tcp://h:4"
            ]),
            Err(count("kv-events-endpoint", 4))
        );
        assert_eq!(
            with(&[
                "--kv-events-endpoint",
                "tcp://h:1,tcp://h:2,tcp://h:3",
                "--kv-events-replay-endpoint",
                "tcp://h:4"
            ]),
            Err(count("kv-events-replay-endpoint", 1))
        );
        assert_eq!(
            with(&["--disaggregation-bootstrap-port", "1,2"]),
            Err(count("disaggregation-bootstrap-port", 2))
        );
        assert_eq!(
            count("port", 2).to_string(),
            "--port has 2 value(s) for 3 workers: give one per worker, comma-separated"
        );
    }

    #[test]
    fn values_two_workers_cannot_share_are_refused() {
        assert_eq!(
            slots(&["--workers", "2", "--worker-id", "a,a"]),
            Err(HostingError::Repeated {
                flag: "worker-id",
                value: "a".into()
            })
        );
        assert_eq!(
            slots(&["--workers", "2", "--port", "9000,9000"]),
            Err(HostingError::Repeated {
                flag: "port",
                value: "9000".into()
            })
        );
        assert_eq!(
            slots(&[
                "--workers",
                "2",
                "--kv-events-endpoint",
                "tcp://h:1,tcp://h:1"
            ]),
            Err(HostingError::Repeated {
                flag: "kv-events-endpoint",
                value: "tcp://h:1".into()
            })
        );
        // Port 0 is any free port, different for each worker.
        assert!(slots(&["--workers", "2", "--port", "0,0"]).is_ok());
    }

    #[test]
    fn other_combinations_are_refused() {
        assert_eq!(slots(&["--workers", "0"]), Err(HostingError::NoWorkers));
        assert_eq!(
            slots(&["--workers", "2", "--port", "65535"]),
            Err(HostingError::PortsExhausted {
                first: 65535,
                workers: 2
            })
        );
        assert_eq!(
            slots(&["--kv-events-replay-endpoint", "tcp://h:1"]),
            Err(HostingError::ReplayWithoutEvents)
        );
    }
}
