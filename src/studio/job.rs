//! The `Job` of studio-api.md §3.1: the checks that turn the studio's raw JSON into a
//! [`JobSpec`] before anything touches the GPU.
//!
//! Validation reads the JSON field by field instead of deserialising it whole, so every bad
//! job gets a precise `invalid_params` message (never quoting the prompt) and no body,
//! however malformed, can crash the worker. The ranges themselves are the vocabulary's
//! (`vocab::job`), shared with `studio-worker generate`.

use std::time::Duration;

use serde_json::{Map, Value};

use super::protocol::{FailCode, check_id};
use crate::human;
use crate::vocab::job::{self, EngineLimits, JobSpec, MAX_SEED, MIN_SIDE, OutOfRange, Scheduler};

/// When a job names no lease (it should), this is assumed.
const DEFAULT_LEASE: Duration = Duration::from_secs(120);
const MIN_LEASE: Duration = Duration::from_secs(10);
const MAX_LEASE: Duration = Duration::from_secs(3600);
/// An id longer than this is not even sent back in a `fail` URL; the job is only logged.
const MAX_ANSWERABLE_ID_BYTES: usize = 1024;

/// Why a job is not run, and how to tell the studio.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rejection {
    /// `None` when the body has no usable id: then it can only be logged (§3.1).
    pub job_id: Option<String>,
    pub code: FailCode,
    pub message: String,
}

/// Checks a claimed job against the protocol's ranges and this engine's limits and models.
/// `pick_seed` is called only when the job has no seed.
pub fn read_job(
    raw: &Value,
    limits: &EngineLimits,
    ready_models: &[String],
    pick_seed: impl FnOnce() -> u64,
) -> Result<JobSpec, Rejection> {
    let Some(fields) = raw.as_object() else {
        return Err(unanswerable("the job is not a JSON object"));
    };
    let job_id = match fields.get("jobId") {
        Some(Value::String(job_id)) => job_id.clone(),
        Some(_) => return Err(unanswerable("jobId is not a string")),
        None => return Err(unanswerable("the job has no jobId")),
    };
    if job_id.is_empty() || job_id.len() > MAX_ANSWERABLE_ID_BYTES {
        return Err(unanswerable("jobId is empty or absurdly long"));
    }
    let invalid = |message: String| Rejection {
        job_id: Some(job_id.clone()),
        code: FailCode::InvalidParams,
        message,
    };
    if let Err(err) = check_id(&job_id) {
        return Err(invalid(format!("jobId is unusable: {err}")));
    }
    let spec = read_fields(fields, &job_id, limits, pick_seed).map_err(invalid)?;
    if !ready_models.contains(&spec.model) {
        return Err(Rejection {
            job_id: Some(job_id),
            code: FailCode::ModelUnavailable,
            message: format!(
                "model {:?} is not available on this worker",
                human::one_line(&spec.model, 41)
            ),
        });
    }
    Ok(spec)
}

fn unanswerable(message: &str) -> Rejection {
    Rejection {
        job_id: None,
        code: FailCode::InvalidParams,
        message: message.to_owned(),
    }
}

fn read_fields(
    fields: &Map<String, Value>,
    job_id: &str,
    limits: &EngineLimits,
    pick_seed: impl FnOnce() -> u64,
) -> Result<JobSpec, String> {
    match fields.get("kind") {
        Some(Value::String(kind)) if kind == "txt2img" => {}
        Some(Value::String(kind)) => {
            return Err(format!(
                "kind {:?} is not supported (only txt2img)",
                human::one_line(kind, 41)
            ));
        }
        Some(_) => return Err("kind must be a string".to_owned()),
        None => return Err("kind is missing".to_owned()),
    }
    let model = required_string(fields, "model")?;
    if model.is_empty() || model.len() > 256 {
        return Err("model must be a name of 1 to 256 bytes".to_owned());
    }
    let prompt = required_string(fields, "prompt")?;
    job::check_prompt("prompt", &prompt).map_err(text)?;
    let negative_prompt = match fields.get("negativePrompt") {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(text)) => text.clone(),
        Some(other) => {
            return Err(format!(
                "negativePrompt must be a string (got {})",
                kind_of(other)
            ));
        }
    };
    job::check_prompt("negativePrompt", &negative_prompt).map_err(text)?;

    let width = job::check_side(
        "width",
        integer(fields, "width")?,
        MIN_SIDE,
        limits.max_width,
    )
    .map_err(text)?;
    let height = job::check_side(
        "height",
        integer(fields, "height")?,
        MIN_SIDE,
        limits.max_height,
    )
    .map_err(text)?;
    let steps = job::check_steps("steps", integer(fields, "steps")?).map_err(text)?;
    let guidance_scale = match fields.get("guidanceScale") {
        Some(Value::Number(number)) => number.as_f64().unwrap_or(f64::NAN),
        Some(other) => {
            return Err(format!(
                "guidanceScale must be a number (got {})",
                kind_of(other)
            ));
        }
        None => return Err("guidanceScale is missing".to_owned()),
    };
    let guidance_scale = job::check_guidance("guidanceScale", guidance_scale).map_err(text)?;
    let seed = match fields.get("seed") {
        None | Some(Value::Null) => pick_seed() & MAX_SEED,
        Some(_) => job::check_seed("seed", integer(fields, "seed")?).map_err(text)?,
    };
    let num_images = job::check_images(
        "numImages",
        integer(fields, "numImages")?,
        limits.max_images,
    )
    .map_err(text)?;
    let scheduler = match fields.get("scheduler") {
        None | Some(Value::Null) => None,
        Some(Value::String(name)) => Some(
            Scheduler::from_protocol(name)
                .ok_or_else(|| format!("scheduler {:?} is not known", human::one_line(name, 41)))?,
        ),
        Some(other) => {
            return Err(format!(
                "scheduler must be a string or null (got {})",
                kind_of(other)
            ));
        }
    };
    let lease = match fields.get("leaseS") {
        None | Some(Value::Null) => DEFAULT_LEASE,
        Some(_) => Duration::from_secs(
            job::check_integer("leaseS", integer(fields, "leaseS")?, 1, 86_400).map_err(text)?,
        ),
    }
    .clamp(MIN_LEASE, MAX_LEASE);

    Ok(JobSpec {
        job_id: job_id.to_owned(),
        model,
        prompt,
        negative_prompt,
        width,
        height,
        steps,
        guidance_scale,
        seed,
        num_images,
        scheduler,
        lease,
    })
}

fn text(error: OutOfRange) -> String {
    error.0
}

fn required_string(fields: &Map<String, Value>, name: &str) -> Result<String, String> {
    match fields.get(name) {
        Some(Value::String(text)) => Ok(text.clone()),
        Some(other) => Err(format!("{name} must be a string (got {})", kind_of(other))),
        None => Err(format!("{name} is missing")),
    }
}

/// A non-negative JSON integer (its range is checked by the caller).
fn integer(fields: &Map<String, Value>, name: &str) -> Result<u64, String> {
    let value = fields
        .get(name)
        .ok_or_else(|| format!("{name} is missing"))?;
    let Value::Number(number) = value else {
        return Err(format!(
            "{name} must be an integer (got {})",
            kind_of(value)
        ));
    };
    match number.as_u64() {
        Some(integer) => Ok(integer),
        None if number.as_i64().is_some() => {
            Err(format!("{name} must not be negative (got {number})"))
        }
        None => Err(format!("{name} must be an integer (got {number})")),
    }
}

fn kind_of(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    const LIMITS: EngineLimits = EngineLimits {
        max_width: 1024,
        max_height: 1024,
        max_images: 4,
    };

    fn good() -> Value {
        json!({
            "jobId": "j_1", "kind": "txt2img", "model": "sd-turbo",
            "prompt": "a lighthouse at dusk, oil painting", "negativePrompt": "",
            "width": 512, "height": 512, "steps": 4, "guidanceScale": 0.0,
            "seed": 42, "numImages": 1, "scheduler": null, "leaseS": 120
        })
    }

    fn check(job: &Value) -> Result<JobSpec, Rejection> {
        read_job(job, &LIMITS, &["sd-turbo".to_owned()], || 7)
    }

    fn with(field: &str, value: Value) -> Value {
        let mut job = good();
        job[field] = value;
        job
    }

    fn without(field: &str) -> Value {
        let mut job = good();
        job.as_object_mut().unwrap().remove(field);
        job
    }

    #[test]
    fn a_good_job_passes_whole() {
        let spec = check(&good()).unwrap();
        assert_eq!(spec.job_id, "j_1");
        assert_eq!(
            (spec.width, spec.height, spec.steps, spec.num_images),
            (512, 512, 4, 1)
        );
        assert_eq!(spec.seed, 42);
        assert_eq!(spec.scheduler, None);
        assert_eq!(spec.lease, Duration::from_secs(120));
        let spec = check(&with("scheduler", json!("dpmpp_2m_karras"))).unwrap();
        assert_eq!(spec.scheduler, Some(Scheduler::DpmPp2mKarras));
    }

    #[test]
    fn an_absent_seed_is_picked_by_the_worker() {
        assert_eq!(check(&without("seed")).unwrap().seed, 7);
        assert_eq!(check(&with("seed", Value::Null)).unwrap().seed, 7);
        assert_eq!(
            check(&with("seed", json!(MAX_SEED))).unwrap().seed,
            MAX_SEED
        );
    }

    #[test]
    fn every_rule_rejects_with_invalid_params() {
        let cases = [
            with("width", json!(513)),
            with("width", json!(56)),
            with("width", json!(2056)),
            with("height", json!(1032)), // over this engine's 1024
            with("width", json!(-512)),
            with("width", json!(512.5)),
            with("width", json!("512")),
            with("steps", json!(0)),
            with("steps", json!(151)),
            with("steps", json!(1e300)),
            with("guidanceScale", json!(30.5)),
            with("guidanceScale", json!(-0.1)),
            with("guidanceScale", json!("7")),
            with("seed", json!(MAX_SEED + 1)),
            with("seed", json!(-1)),
            with("seed", json!("42")),
            with("numImages", json!(0)),
            with("numImages", json!(9)),
            with("numImages", json!(5)), // over this engine's 4
            with("scheduler", json!("plms")),
            with("scheduler", json!(3)),
            with("prompt", json!("x".repeat(4001))),
            with("prompt", json!(null)),
            with("negativePrompt", json!(["x"])),
            with("kind", json!("img2img")),
            with("leaseS", json!(0)),
            with("jobId", json!("j\u{0}1")),
            with("jobId", json!("j".repeat(129))),
            without("width"),
            without("prompt"),
            without("kind"),
            without("numImages"),
        ];
        for job in cases {
            let rejection =
                check(&job).expect_err(&job.to_string()[..120.min(job.to_string().len())]);
            assert_eq!(
                rejection.code,
                FailCode::InvalidParams,
                "{}",
                rejection.message
            );
            assert!(rejection.job_id.is_some(), "{}", rejection.message);
            assert!(
                rejection.message.len() < 200,
                "short message: {}",
                rejection.message
            );
        }
    }

    #[test]
    fn a_4000_character_prompt_is_fine_and_a_10_mb_one_is_not_quoted() {
        assert!(check(&with("prompt", json!("é".repeat(4000)))).is_ok());
        let rejection = check(&with("prompt", json!("x".repeat(10 << 20)))).unwrap_err();
        assert!(rejection.message.len() < 100);
    }

    #[test]
    fn an_unknown_model_is_model_unavailable() {
        let rejection = check(&with("model", json!("sdxl-turbo"))).unwrap_err();
        assert_eq!(rejection.code, FailCode::ModelUnavailable);
        assert_eq!(rejection.job_id.as_deref(), Some("j_1"));
    }

    #[test]
    fn a_job_without_a_usable_id_can_only_be_logged() {
        for job in [
            json!(null),
            json!([1]),
            json!("j_1"),
            without("jobId"),
            with("jobId", json!(5)),
            with("jobId", json!("")),
        ] {
            assert_eq!(check(&job).unwrap_err().job_id, None, "{job}");
        }
    }

    #[test]
    fn lease_is_clamped_and_defaulted() {
        assert_eq!(
            check(&without("leaseS")).unwrap().lease,
            Duration::from_secs(120)
        );
        assert_eq!(
            check(&with("leaseS", json!(2))).unwrap().lease,
            Duration::from_secs(10)
        );
        assert_eq!(
            check(&with("leaseS", json!(86_400))).unwrap().lease,
            Duration::from_secs(3600)
        );
    }

    /// Values a broken or hostile studio may send where a number, a string or a choice
    /// belongs.
    fn hostile_value() -> impl proptest::strategy::Strategy<Value = Value> {
        use proptest::prelude::*;
        prop_oneof![
            any::<i64>().prop_map(|number| json!(number)),
            any::<u64>().prop_map(|number| json!(number)),
            any::<f64>()
                .prop_filter("JSON has no NaN", |number| number.is_finite())
                .prop_map(|number| json!(number)),
            Just(json!(512)),
            Just(json!(0)),
            Just(json!(1e300)),
            Just(Value::Null),
            Just(json!(true)),
            ".{0,40}".prop_map(Value::String),
            Just(json!("euler_a")),
            Just(json!("x".repeat(5000))),
            Just(json!([])),
            Just(json!({ "nested": [1, 2] })),
        ]
    }

    proptest::proptest! {
        #![proptest_config(proptest::test_runner::Config {
            cases: 5000,
            failure_persistence: None,
            ..proptest::test_runner::Config::default()
        })]

        /// Thousands of jobs with fields replaced, removed or added: each is run within the
        /// limits or refused with a message, never a panic.
        #[test]
        fn mutated_jobs_are_taken_within_limits_or_refused(
            field in proptest::sample::select(vec![
                "jobId", "kind", "model", "prompt", "negativePrompt", "width", "height",
                "steps", "guidanceScale", "seed", "numImages", "scheduler", "leaseS", "extra",
            ]),
            value in proptest::option::weighted(0.9, hostile_value()),
            second in proptest::option::of((
                proptest::sample::select(vec!["width", "steps", "seed", "prompt", "leaseS"]),
                hostile_value(),
            )),
        ) {
            let mut job = match value {
                Some(value) => with(field, value),
                None => without(field),
            };
            if let Some((field, value)) = second {
                job[field] = value;
            }
            match check(&job) {
                Ok(spec) => {
                    proptest::prop_assert!(spec.width <= LIMITS.max_width && spec.width >= 64);
                    proptest::prop_assert!(spec.height <= LIMITS.max_height && spec.height >= 64);
                    proptest::prop_assert!(spec.width % 8 == 0 && spec.height % 8 == 0);
                    proptest::prop_assert!((1..=150).contains(&spec.steps));
                    proptest::prop_assert!((1..=LIMITS.max_images).contains(&spec.num_images));
                    proptest::prop_assert!((0.0..=30.0).contains(&spec.guidance_scale));
                    proptest::prop_assert!(spec.seed <= MAX_SEED);
                    proptest::prop_assert!(spec.prompt.chars().count() <= 4000);
                    proptest::prop_assert!(spec.job_id.len() <= 128);
                }
                Err(rejection) => {
                    proptest::prop_assert!(!rejection.message.is_empty());
                    proptest::prop_assert!(rejection.message.len() < 300, "{}", rejection.message);
                }
            }
        }
    }
}
