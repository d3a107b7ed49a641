//! What a benchmark sends: arrivals in simulated time, each a single request
//! or a chat session whose turns re-send their history.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

use crate::fleet_bench::scale::scaled_count;

/// The prompt of one request as the engine receives it.
#[derive(Debug, Clone)]
pub enum Prompt {
    /// `/v1/completions` with a token-id prompt.
    TokenIds(Vec<u32>),
    /// `/v1/chat/completions` with these messages.
    Chat(Vec<Value>),
}

impl Prompt {
    /// The streamed request body for `model`.
    pub fn body(&self, model: &str, max_tokens: u32) -> Value {
        match self {
            Self::TokenIds(tokens) => json!({"model": model, "prompt": tokens,
                "max_tokens": max_tokens, "stream": true,
                "stream_options": {"include_usage": true}}),
            Self::Chat(messages) => json!({"model": model, "messages": messages,
                "max_tokens": max_tokens, "stream": true,
                "stream_options": {"include_usage": true}}),
        }
    }

    /// Path of the OpenAI endpoint this prompt goes to.
    pub fn path(&self) -> &'static str {
        match self {
            Self::TokenIds(_) => "/v1/completions",
            Self::Chat(_) => "/v1/chat/completions",
        }
    }
}

/// A conversation that starts at one arrival time.
#[derive(Debug, Clone)]
pub enum Conversation {
    Single {
        prompt: Prompt,
        max_tokens: u32,
    },
    /// Each user turn is sent with the whole history before it, including
    /// the answers the engine streamed; the next turn follows `think`
    /// simulated seconds after an answer ends.
    Session {
        system: String,
        user_turns: Vec<String>,
        max_tokens: u32,
        think: f64,
    },
}

impl Conversation {
    pub fn requests(&self) -> usize {
        match self {
            Self::Single { .. } => 1,
            Self::Session { user_turns, .. } => user_turns.len(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Arrival {
    /// Simulated seconds from the start of the run.
    pub at: f64,
    pub conversation: Conversation,
}

/// A named workload and the fleet settings it was sized for.
#[derive(Debug, Clone)]
pub struct Workload {
    pub name: String,
    /// One line saying what it is, with its parameters.
    pub description: String,
    pub arrivals: Vec<Arrival>,
    /// KV blocks per simulated GPU (`--num-gpu-blocks`).
    pub cache_blocks: u32,
    /// Longest prompt plus output (`--max-model-len`).
    pub max_model_len: u32,
    /// Further sim-engine arguments this workload was sized with.
    pub sim_args: Vec<String>,
    /// How much faster than real time the fleet runs it. Real-time costs on
    /// the request path (tokenizing text prompts in the sidecar and the
    /// engines on a shared 2-core machine) are multiplied by it, so text
    /// workloads run at 1.
    pub speedup: f64,
}

impl Workload {
    /// Whether any prompt is sent as token ids.
    pub fn has_token_ids(&self) -> bool {
        self.arrivals.iter().any(|a| {
            matches!(
                a.conversation,
                Conversation::Single {
                    prompt: Prompt::TokenIds(_),
                    ..
                }
            )
        })
    }

    pub fn requests(&self) -> usize {
        self.arrivals
            .iter()
            .map(|a| a.conversation.requests())
            .sum()
    }
}

/// Multi-tenant shared prefixes: `tenants` system prompts of
/// `tenant_prefix_tokens`, each with `users_per_tenant` users asking
/// questions of `question_tokens`; tenants are picked uniformly.
#[derive(Debug, Clone, clap::Args)]
pub struct MultiTenant {
    #[arg(long, default_value_t = 16)]
    pub tenants: u32,
    #[arg(long, default_value_t = 4_000)]
    pub tenant_prefix_tokens: u32,
    #[arg(long, default_value_t = 8)]
    pub users_per_tenant: u32,
    #[arg(long, default_value_t = 150)]
    pub question_tokens: u32,
    #[arg(long, default_value_t = 400)]
    pub tenant_requests: u32,
    /// Arrivals per simulated second (Poisson).
    #[arg(long, default_value_t = 6.0)]
    pub tenant_rate: f64,
    #[arg(long, default_value_t = 64)]
    pub tenant_output_tokens: u32,
    /// KV blocks per worker: room for 6 of the 16 default tenants'
    /// prefixes, so the fleet holds them all (24) only if tenants are spread
    /// evenly — where a tenant goes decides whether its prefix stays cached.
    #[arg(long, default_value_t = 1_500)]
    pub tenant_cache_blocks: u32,
}

impl MultiTenant {
    /// The same workload for a fleet `factor` times larger: tenants,
    /// requests and their rate × `factor`, so each GPU keeps the share of
    /// tenants and load it had and the run spans as much simulated time.
    pub fn scaled(&self, factor: f64) -> Self {
        Self {
            tenants: scaled_count(self.tenants, factor),
            tenant_requests: scaled_count(self.tenant_requests, factor),
            tenant_rate: self.tenant_rate * factor,
            ..self.clone()
        }
    }

    pub fn workload(&self, seed: u64) -> Workload {
        let mut rng = StdRng::seed_from_u64(seed);
        let systems: Vec<String> = (0..self.tenants)
            .map(|t| {
                let mut text = format!("You are the assistant of tenant {t}. Reference material: ");
                text.push_str(&words(&mut rng, self.tenant_prefix_tokens));
                text
            })
            .collect();
        let mut at = 0.0;
        let arrivals = (0..self.tenant_requests)
            .map(|_| {
                at += exponential(&mut rng, self.tenant_rate);
                let tenant = rng.random_range(0..self.tenants) as usize;
                let user = rng.random_range(0..self.users_per_tenant);
                let question = format!(
                    "I am user {user}. {}?",
                    words(&mut rng, self.question_tokens)
                );
                let messages = vec![
                    json!({"role": "system", "content": systems[tenant]}),
                    json!({"role": "user", "content": question}),
                ];
                Arrival {
                    at,
                    conversation: Conversation::Single {
                        prompt: Prompt::Chat(messages),
                        max_tokens: self.tenant_output_tokens,
                    },
                }
            })
            .collect();
        Workload {
            name: "multi-tenant".to_owned(),
            description: format!(
                "{} tenants × {}-token system prompt × {} users × {}-token question, {} chat requests at {}/s (Poisson), {} output tokens",
                self.tenants, self.tenant_prefix_tokens, self.users_per_tenant, self.question_tokens,
                self.tenant_requests, self.tenant_rate, self.tenant_output_tokens
            ),
            arrivals,
            cache_blocks: self.tenant_cache_blocks,
            max_model_len: 32_768,
            sim_args: Vec::new(),
            speedup: 1.0,
        }
    }
}

/// Multi-turn chat sessions that re-send their history: a shared system
/// prompt, a long first message (a pasted document), short follow-ups.
#[derive(Debug, Clone, clap::Args)]
pub struct MultiTurn {
    #[arg(long, default_value_t = 64)]
    pub sessions: u32,
    #[arg(long, default_value_t = 5)]
    pub turns: u32,
    #[arg(long, default_value_t = 500)]
    pub session_system_tokens: u32,
    #[arg(long, default_value_t = 2_000)]
    pub first_message_tokens: u32,
    #[arg(long, default_value_t = 100)]
    pub follow_up_tokens: u32,
    #[arg(long, default_value_t = 100)]
    pub session_output_tokens: u32,
    /// Session starts per simulated second (Poisson).
    #[arg(long, default_value_t = 2.0)]
    pub session_rate: f64,
    /// Simulated seconds between an answer and the next question.
    #[arg(long, default_value_t = 2.0)]
    pub think_seconds: f64,
    #[arg(long, default_value_t = 2_500)]
    pub session_cache_blocks: u32,
}

impl MultiTurn {
    /// The same workload for a fleet `factor` times larger: sessions and
    /// their rate × `factor` (they share one system prompt).
    pub fn scaled(&self, factor: f64) -> Self {
        Self {
            sessions: scaled_count(self.sessions, factor),
            session_rate: self.session_rate * factor,
            ..self.clone()
        }
    }

    pub fn workload(&self, seed: u64) -> Workload {
        let mut rng = StdRng::seed_from_u64(seed);
        let system = format!(
            "You are a helpful assistant. House rules: {}",
            words(&mut rng, self.session_system_tokens)
        );
        let mut at = 0.0;
        let arrivals = (0..self.sessions)
            .map(|session| {
                at += exponential(&mut rng, self.session_rate);
                let user_turns = (0..self.turns)
                    .map(|turn| {
                        let length = if turn == 0 {
                            self.first_message_tokens
                        } else {
                            self.follow_up_tokens
                        };
                        format!(
                            "Session {session}, turn {turn}: {}",
                            words(&mut rng, length)
                        )
                    })
                    .collect();
                Arrival {
                    at,
                    conversation: Conversation::Session {
                        system: system.clone(),
                        user_turns,
                        max_tokens: self.session_output_tokens,
                        think: self.think_seconds,
                    },
                }
            })
            .collect();
        Workload {
            name: "multi-turn".to_owned(),
            description: format!(
                "{} chat sessions × {} turns at {}/s (Poisson): {}-token system prompt, {}-token first message, {}-token follow-ups, {} output tokens, {} s think time",
                self.sessions, self.turns, self.session_rate, self.session_system_tokens,
                self.first_message_tokens, self.follow_up_tokens, self.session_output_tokens, self.think_seconds
            ),
            arrivals,
            cache_blocks: self.session_cache_blocks,
            max_model_len: 32_768,
            sim_args: Vec::new(),
            speedup: 1.0,
        }
    }
}

/// Seconds to the next Poisson arrival at `rate` per second.
fn exponential(rng: &mut StdRng, rate: f64) -> f64 {
    let uniform: f64 = rng.random_range(f64::EPSILON..1.0);
    -uniform.ln() / rate
}

/// Common words, each one token for BPE vocabularies such as Qwen3's when
/// preceded by a space, so `count` words are about `count` tokens.
const WORDS: &[&str] = &[
    "system", "data", "model", "network", "service", "request", "response", "value", "table",
    "index", "record", "policy", "account", "report", "market", "price", "order", "customer",
    "product", "support", "energy", "water", "river", "mountain", "city", "garden", "music",
    "history", "science", "language", "paper", "window", "door", "light", "green", "blue", "red",
    "small", "large", "early", "late", "north", "south", "east", "west", "summer", "winter",
    "morning", "evening", "number", "letter", "story", "game", "team", "player", "school",
    "teacher", "student", "doctor", "health", "travel", "train", "road", "bridge",
];

/// About `count` tokens of deterministic English-like text.
fn words(rng: &mut StdRng, count: u32) -> String {
    let mut text = String::with_capacity(count as usize * 7);
    for i in 0..count {
        if i > 0 {
            text.push(' ');
        }
        text.push_str(WORDS[rng.random_range(0..WORDS.len())]);
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workloads_are_deterministic_and_ordered() {
        let params = MultiTenant {
            tenants: 3,
            tenant_prefix_tokens: 20,
            users_per_tenant: 2,
            question_tokens: 5,
            tenant_requests: 50,
            tenant_rate: 10.0,
            tenant_output_tokens: 4,
            tenant_cache_blocks: 100,
        };
        let a = params.workload(7);
        let b = params.workload(7);
        assert_eq!(a.requests(), 50);
        assert!(a.arrivals.windows(2).all(|w| w[0].at <= w[1].at));
        let bodies = |w: &Workload| -> Vec<String> {
            w.arrivals
                .iter()
                .map(|a| match &a.conversation {
                    Conversation::Single { prompt, .. } => prompt.body("m", 1).to_string(),
                    Conversation::Session { .. } => panic!("multi-tenant requests are single"),
                })
                .collect()
        };
        assert_eq!(bodies(&a), bodies(&b));
        // Mean inter-arrival near 1/rate.
        let mean = a.arrivals.last().unwrap().at / 50.0;
        assert!((0.05..0.2).contains(&mean), "mean gap {mean}");
    }

    #[test]
    fn scaling_multiplies_tenants_requests_and_rate() {
        let params = MultiTenant {
            tenants: 16,
            tenant_prefix_tokens: 20,
            users_per_tenant: 8,
            question_tokens: 5,
            tenant_requests: 400,
            tenant_rate: 6.0,
            tenant_output_tokens: 4,
            tenant_cache_blocks: 1_500,
        };
        let scaled = params.scaled(4.0);
        assert_eq!(
            (scaled.tenants, scaled.tenant_requests, scaled.tenant_rate),
            (64, 1_600, 24.0)
        );
        assert_eq!(
            (scaled.users_per_tenant, scaled.tenant_cache_blocks),
            (8, 1_500)
        );
        let (base, big) = (params.workload(1), scaled.workload(1));
        assert_eq!(big.requests(), 1_600);
        // The same simulated span, within Poisson noise.
        let span = |w: &Workload| w.arrivals.last().unwrap().at;
        assert!((span(&big) / span(&base) - 1.0).abs() < 0.15);
    }

    #[test]
    fn token_id_prompts_are_told_apart_from_chat() {
        let workload = |prompt| Workload {
            name: "w".into(),
            description: String::new(),
            arrivals: vec![Arrival {
                at: 0.0,
                conversation: Conversation::Single {
                    prompt,
                    max_tokens: 1,
                },
            }],
            cache_blocks: 1,
            max_model_len: 8,
            sim_args: Vec::new(),
            speedup: 1.0,
        };
        assert!(workload(Prompt::TokenIds(vec![1, 2])).has_token_ids());
        assert!(
            !workload(Prompt::Chat(vec![json!({"role": "user", "content": "hi"})])).has_token_ids()
        );
    }

    #[test]
    fn sessions_count_every_turn() {
        let params = MultiTurn {
            sessions: 4,
            turns: 3,
            session_system_tokens: 5,
            first_message_tokens: 10,
            follow_up_tokens: 3,
            session_output_tokens: 4,
            session_rate: 1.0,
            think_seconds: 1.0,
            session_cache_blocks: 100,
        };
        assert_eq!(params.workload(1).requests(), 12);
    }
}
