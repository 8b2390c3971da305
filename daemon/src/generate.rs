//! One generation request, as a state machine driven by logits.
//!
//! [`Generation`] owns everything per request except the engine state:
//! sampler, streaming detokenizer, stop matcher, limits and counters. The
//! caller runs the engine and hands each step's logits to
//! [`Generation::accept`], which samples, decides whether to finish, and
//! returns the text that became final. The CLI drives it in a loop
//! ([`run`]); a scheduler can drive many of them between batched steps.

use std::time::{Duration, Instant};

use serde::Serialize;

use crate::engine::{EngineError, Logits, Model, SeqState};
use crate::sample::{Sampled, Sampler, SamplingParams};
use crate::text::{StopCheck, StopMatcher, StreamDecoder};

/// Why generation ended, in OpenAI's vocabulary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FinishReason {
    /// `max_tokens` reached, or the context is full.
    Length,
    /// A stop sequence matched.
    Stop,
    /// The model produced an end-of-sequence token.
    Eos,
    /// The request's deadline passed (serving only).
    Timeout,
}

impl FinishReason {
    /// As printed in JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Length => "length",
            FinishReason::Stop => "stop",
            FinishReason::Eos => "eos",
            FinishReason::Timeout => "timeout",
        }
    }
}

/// What to do with a prompt longer than the context allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Truncate {
    /// Refuse the request.
    #[default]
    Error,
    /// Keep the last tokens of the prompt.
    Left,
}

/// Everything a request asks for, beyond the prompt.
#[derive(Debug, Clone)]
pub struct GenerateParams {
    /// Sampling settings.
    pub sampling: SamplingParams,
    /// Most tokens to generate.
    pub max_tokens: usize,
    /// Stop sequences, matched on text.
    pub stop: Vec<String>,
    /// Keep generating past end-of-sequence tokens (benchmarks, goldens).
    pub ignore_eos: bool,
    /// Policy for prompts that do not fit.
    pub truncate: Truncate,
}

impl Default for GenerateParams {
    fn default() -> Self {
        GenerateParams {
            sampling: SamplingParams::default(),
            max_tokens: 128,
            stop: vec![],
            ignore_eos: false,
            truncate: Truncate::Error,
        }
    }
}

/// One sampled token and the text it completed.
#[derive(Debug, Clone)]
pub struct Step {
    /// The sampled token (also when it is EOS).
    pub sampled: Sampled,
    /// Text that became final with this token (may be empty).
    pub text: String,
    /// Set when this step ends the request.
    pub finish: Option<FinishReason>,
}

/// Token and timing counts of a finished request.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Usage {
    /// Prompt tokens fed to the model.
    pub prompt_tokens: usize,
    /// Tokens generated.
    pub completion_tokens: usize,
    /// Sum of both.
    pub total_tokens: usize,
}

impl Usage {
    /// Counts for `prompt` tokens in and `completion` out.
    pub fn new(prompt: usize, completion: usize) -> Usage {
        Usage {
            prompt_tokens: prompt,
            completion_tokens: completion,
            total_tokens: prompt + completion,
        }
    }
}

/// Wall-clock timings of a request.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Timings {
    /// Prompt processing.
    pub prefill_ms: f64,
    /// Request start to first token.
    pub ttft_ms: f64,
    /// All generation after the first token.
    pub decode_ms: f64,
    /// Generated tokens after the first, per second of decode.
    pub decode_tokens_per_s: f64,
}

impl Timings {
    /// From the prefill time, the time to first token and the total, for `n`
    /// generated tokens.
    pub fn measure(prefill: Duration, ttft: Duration, total: Duration, n: usize) -> Timings {
        let decode = total.saturating_sub(ttft);
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        Timings {
            prefill_ms: ms(prefill),
            ttft_ms: ms(ttft),
            decode_ms: ms(decode),
            decode_tokens_per_s: if n > 1 && decode.as_secs_f64() > 0.0 {
                (n - 1) as f64 / decode.as_secs_f64()
            } else {
                0.0
            },
        }
    }
}

/// The per-request state machine.
#[derive(Debug)]
pub struct Generation {
    params: GenerateParams,
    sampler: Sampler,
    detok: StreamDecoder,
    stops: StopMatcher,
    eos: Vec<u32>,
    prompt_ids: Vec<u32>,
    finish: Option<FinishReason>,
}

impl Generation {
    /// Check the request against the model and prepare its state. Returns
    /// the (possibly truncated) prompt ids to prefill with.
    pub fn new(
        model: &Model,
        mut prompt_ids: Vec<u32>,
        params: GenerateParams,
    ) -> Result<Self, EngineError> {
        params.sampling.validate()?;
        if prompt_ids.is_empty() {
            return Err(EngineError::EmptyPrompt);
        }
        let vocab = model.backend.vocab_size();
        if let Some(&bad) = prompt_ids.iter().find(|&&t| t as usize >= vocab) {
            return Err(EngineError::BadToken(bad, vocab));
        }
        if let Some(ctx) = model.context {
            // The prompt and every requested token must fit the context.
            let max_tokens = params.max_tokens.max(1);
            if prompt_ids.len() + max_tokens > ctx {
                if params.truncate == Truncate::Error || max_tokens >= ctx {
                    return Err(EngineError::PromptTooLong {
                        prompt: prompt_ids.len(),
                        context: ctx,
                        max_tokens: params.max_tokens,
                    });
                }
                // Truncate::Left keeps the tail of the prompt.
                prompt_ids.drain(..prompt_ids.len() + max_tokens - ctx);
            }
        }
        let sampler = Sampler::new(params.sampling.clone(), vocab, &prompt_ids);
        Ok(Generation {
            stops: StopMatcher::new(&params.stop),
            eos: if params.ignore_eos {
                vec![]
            } else {
                model.eos_ids.clone()
            },
            params,
            sampler,
            detok: StreamDecoder::new(),
            prompt_ids,
            finish: None,
        })
    }

    /// The prompt as it will be fed (after truncation).
    pub fn prompt_ids(&self) -> &[u32] {
        &self.prompt_ids
    }

    /// Tokens generated so far (EOS excluded).
    pub fn output_ids(&self) -> &[u32] {
        self.detok.ids()
    }

    /// Set once the request is over.
    pub fn finish_reason(&self) -> Option<FinishReason> {
        self.finish
    }

    /// Sample from the logits of the last position and advance. After a step
    /// with `finish` set, the caller stops; otherwise it feeds `sampled.token`.
    pub fn accept(&mut self, model: &Model, logits: &mut [f32]) -> Result<Step, EngineError> {
        let sampled = self.sampler.sample(logits);
        let tok = &model.tokenizer;
        if self.eos.contains(&sampled.token) {
            return self.finish_with(tok, sampled, String::new(), FinishReason::Eos);
        }
        let piece = self.detok.push(tok, sampled.token)?.unwrap_or_default();
        let text = match self.stops.push(&piece) {
            StopCheck::Stop(text) => return Ok(self.end(sampled, text, FinishReason::Stop)),
            StopCheck::Continue(text) => text,
        };
        let n = self.detok.ids().len();
        // Validation in `new` guarantees prompt + max_tokens fits the context.
        if n >= self.params.max_tokens {
            return self.finish_with(tok, sampled, text, FinishReason::Length);
        }
        Ok(Step {
            sampled,
            text,
            finish: None,
        })
    }

    /// End the request from outside (deadline): the text still held back,
    /// which the caller sends before its final message.
    pub fn interrupt(&mut self, model: &Model, why: FinishReason) -> Result<String, EngineError> {
        let mut text = self.detok.finish(&model.tokenizer)?;
        text = match self.stops.push(&text) {
            StopCheck::Stop(rest) => rest,
            StopCheck::Continue(mut rest) => {
                rest.push_str(&self.stops.flush());
                rest
            }
        };
        self.finish = Some(why);
        Ok(text)
    }

    fn end(&mut self, sampled: Sampled, text: String, why: FinishReason) -> Step {
        self.finish = Some(why);
        Step {
            sampled,
            text,
            finish: Some(why),
        }
    }

    /// End the request: release the text still held back (an incomplete
    /// character, then text held for stop matching). If that tail completes a
    /// stop sequence the request ends on `stop` instead of `why`.
    fn finish_with(
        &mut self,
        tok: &crate::text::Tokenizer,
        sampled: Sampled,
        mut text: String,
        why: FinishReason,
    ) -> Result<Step, EngineError> {
        let tail = self.detok.finish(tok)?;
        let why = match self.stops.push(&tail) {
            StopCheck::Stop(rest) => {
                text.push_str(&rest);
                FinishReason::Stop
            }
            StopCheck::Continue(rest) => {
                text.push_str(&rest);
                text.push_str(&self.stops.flush());
                why
            }
        };
        Ok(self.end(sampled, text, why))
    }
}

/// A finished request, as `emberd generate --json` prints it.
#[derive(Debug, Clone, Serialize)]
pub struct Completion {
    /// Generated text (stop sequence excluded).
    pub text: String,
    /// Generated token ids (EOS excluded).
    pub token_ids: Vec<u32>,
    /// Prompt ids as fed.
    pub prompt_token_ids: Vec<u32>,
    /// Why it ended.
    pub finish_reason: FinishReason,
    /// Counts.
    pub usage: Usage,
    /// Timings.
    pub timings: Timings,
    /// Per generated token: its logprob and the top alternatives, when asked.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub logprobs: Option<Vec<TokenLogprobs>>,
}

/// Logprob information of one generated token.
#[derive(Debug, Clone, Serialize)]
pub struct TokenLogprobs {
    /// Token id.
    pub token: u32,
    /// Its logprob.
    pub logprob: f32,
    /// Best alternatives: (id, logprob).
    pub top: Vec<(u32, f32)>,
}

/// Run a whole request on one sequence, calling `on_text` with each final piece.
pub fn run(
    model: &Model,
    prompt_ids: Vec<u32>,
    params: GenerateParams,
    mut on_text: impl FnMut(&str),
) -> Result<Completion, EngineError> {
    let t0 = Instant::now();
    let want_logprobs = params.sampling.logprobs.is_some();
    let mut gen = Generation::new(model, prompt_ids, params)?;
    let mut state: SeqState = model.backend.new_state()?;
    let mut logits = Vec::with_capacity(model.backend.vocab_size());
    let prompt = gen.prompt_ids().to_vec();
    model
        .backend
        .forward(&mut state, &prompt, Logits::Last, &mut logits)?;
    let prefill = t0.elapsed();
    let mut text = String::new();
    let mut lp = vec![];
    let mut first: Option<Duration> = None;
    loop {
        let step = gen.accept(model, &mut logits)?;
        first.get_or_insert_with(|| t0.elapsed());
        if want_logprobs && !(step.finish == Some(FinishReason::Eos)) {
            lp.push(TokenLogprobs {
                token: step.sampled.token,
                logprob: step.sampled.logprob,
                top: step.sampled.top.iter().copied().collect(),
            });
        }
        if !step.text.is_empty() {
            on_text(&step.text);
            text.push_str(&step.text);
        }
        if step.finish.is_some() {
            break;
        }
        model
            .backend
            .forward(&mut state, &[step.sampled.token], Logits::Last, &mut logits)?;
    }
    let total = t0.elapsed();
    let ttft = first.unwrap_or(total);
    let n = gen.output_ids().len();
    let usage = Usage::new(prompt.len(), n);
    Ok(Completion {
        text,
        token_ids: gen.output_ids().to_vec(),
        prompt_token_ids: prompt,
        finish_reason: gen.finish_reason().unwrap_or(FinishReason::Length),
        usage,
        timings: Timings::measure(prefill, ttft, total, n),
        logprobs: want_logprobs.then_some(lp),
    })
}
