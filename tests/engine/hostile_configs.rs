//! Model folders whose config files were mutated, thousands of ways: each is opened (and,
//! when the folder check passes, checked against its weights) or refused with the file and
//! the field, never a panic and never an absurd allocation.

use std::path::Path;

use proptest::prelude::*;
use proptest::sample::Index;
use serde_json::{Value, json};
use studio_worker::engine::sd::model_folder::{FolderError, ModelFolder};

use crate::support::{FIXTURES, fixture};

const CONFIG_FILES: [&str; 6] = [
    "model_index.json",
    "unet/config.json",
    "vae/config.json",
    "text_encoder/config.json",
    "text_encoder_2/config.json",
    "scheduler/scheduler_config.json",
];

/// Values a broken or hostile file may hold where a size, a name or a flag belongs.
fn hostile_value() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(json!(0)),
        Just(json!(-1)),
        Just(json!(1)),
        Just(json!(3)),
        Just(json!(33)),
        Just(json!(u64::MAX)),
        Just(json!(i64::MIN)),
        Just(json!(1u64 << 40)),
        Just(json!(1e308)),
        Just(json!(-1e-300)),
        Just(json!(0.5)),
        any::<i32>().prop_map(|number| json!(number)),
        Just(Value::Null),
        Just(json!("")),
        Just(json!("linear")),
        "[a-zA-Z_]{0,12}".prop_map(Value::String),
        Just(json!([])),
        prop::collection::vec(0_u64..100_000, 0..12).prop_map(|numbers| json!(numbers)),
        Just(json!([0, 0, 0, 0])),
        Just(json!({})),
        Just(json!(true)),
    ]
}

/// One mutation: which file, which field (or which element of an array field), and what it
/// becomes (`None`: the field is removed).
#[derive(Clone, Debug)]
struct Mutation {
    fixture: Index,
    file: Index,
    field: Index,
    element: Option<Index>,
    value: Option<Value>,
}

fn mutation() -> impl Strategy<Value = Mutation> {
    (
        any::<Index>(),
        any::<Index>(),
        any::<Index>(),
        any::<Option<Index>>(),
        prop::option::weighted(0.9, hostile_value()),
    )
        .prop_map(|(fixture, file, field, element, value)| Mutation {
            fixture,
            file,
            field,
            element,
            value,
        })
}

/// Copies a fixture's config files into `to`, with `mutation` applied; its weights and
/// tokenizers are linked, not copied.
fn mutated_copy(mutation: &Mutation, to: &Path) {
    let name = mutation.fixture.get(&FIXTURES);
    let from = fixture(name);
    link_the_rest(&from, to);
    let present: Vec<&str> = CONFIG_FILES
        .iter()
        .copied()
        .filter(|file| from.join(file).exists())
        .collect();
    let target = *mutation.file.get(&present);
    for file in &present {
        let text = std::fs::read_to_string(from.join(file)).unwrap();
        let text = if *file == target {
            mutate(&text, mutation)
        } else {
            text
        };
        let path = to.join(file);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    }
}

/// Links every file under `from` that is not a config file into the same place under `to`.
fn link_the_rest(from: &Path, to: &Path) {
    for entry in std::fs::read_dir(from).unwrap() {
        let path = entry.unwrap().path();
        let target = to.join(path.file_name().unwrap());
        if path.is_dir() {
            std::fs::create_dir_all(&target).unwrap();
            link_the_rest(&path, &target);
        } else if path.extension().is_some_and(|ext| ext != "json")
            || path.ends_with("tokenizer/tokenizer.json")
        {
            #[cfg(unix)]
            std::os::unix::fs::symlink(&path, &target).unwrap();
            #[cfg(not(unix))]
            std::fs::copy(&path, &target).unwrap();
        }
    }
}

fn mutate(text: &str, mutation: &Mutation) -> String {
    let mut config: Value = serde_json::from_str(text).unwrap();
    let fields = config.as_object_mut().unwrap();
    let keys: Vec<String> = fields.keys().cloned().collect();
    let key = mutation.field.get(&keys).clone();
    match (&mutation.value, mutation.element, fields.get_mut(&key)) {
        (Some(value), Some(element), Some(Value::Array(items))) if !items.is_empty() => {
            *element.get_mut(items) = value.clone();
        }
        (Some(value), _, _) => {
            fields.insert(key, value.clone());
        }
        (None, _, _) => {
            fields.remove(&key);
        }
    }
    config.to_string()
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 3000,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn mutated_configs_open_or_are_refused_by_file_never_a_panic(mutation in mutation()) {
        let folder = tempfile::tempdir().unwrap();
        mutated_copy(&mutation, folder.path());
        match ModelFolder::open(folder.path()) {
            Ok(opened) => {
                // What passed is small enough to build: every size within the bounds, and
                // building it against the weights' headers ends in a verdict.
                prop_assert!(opened.vae.scale_factor() <= 128);
                prop_assert!(opened.unet.blocks.iter().all(|block| block.out_channels <= 8192));
                let _ = studio_worker::engine::sd::open_checked(folder.path());
            }
            Err(FolderError::Invalid { file, reason }) => {
                prop_assert!(CONFIG_FILES.contains(&file.as_str()), "{file}");
                prop_assert!(!reason.is_empty());
                prop_assert!(
                    !reason.contains(&*folder.path().to_string_lossy()),
                    "the reason names no folder: {reason}"
                );
            }
            Err(FolderError::Missing { file }) => {
                prop_assert!(CONFIG_FILES.contains(&file.as_str()), "{file}");
            }
            Err(FolderError::Unsupported(reason)) => prop_assert!(!reason.is_empty()),
        }
    }
}

#[test]
fn a_wrong_field_is_named_with_its_file() {
    let folder = tempfile::tempdir().unwrap();
    for file in CONFIG_FILES {
        let from = fixture("tiny-sd1").join(file);
        if from.exists() {
            let to = folder.path().join(file);
            std::fs::create_dir_all(to.parent().unwrap()).unwrap();
            std::fs::copy(from, to).unwrap();
        }
    }
    let vae = folder.path().join("vae/config.json");
    let mut config: Value = serde_json::from_str(&std::fs::read_to_string(&vae).unwrap()).unwrap();
    config["norm_num_groups"] = json!(0);
    std::fs::write(&vae, config.to_string()).unwrap();
    let error = ModelFolder::open(folder.path()).unwrap_err().to_string();
    assert!(error.starts_with("vae/config.json is not valid"), "{error}");
    assert!(error.contains("norm_num_groups is 0"), "{error}");

    config["norm_num_groups"] = json!(32);
    config["block_out_channels"] = json!([32, -64]);
    std::fs::write(&vae, config.to_string()).unwrap();
    let error = ModelFolder::open(folder.path()).unwrap_err().to_string();
    assert!(error.contains("block_out_channels[1]"), "{error}");
}
