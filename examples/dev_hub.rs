//! A Hugging Face hub on your own machine, serving a model folder, to try `models pull`
//! and the worker's background downloads without the internet.
//!
//! ```sh
//! cargo run --example dev_hub -- tests/fixtures/models/tiny-sd1 stabilityai/sd-turbo
//! HF_ENDPOINT=http://127.0.0.1:8788 HF_HUB_CACHE=/tmp/hub cargo run -- models pull sd-turbo
//! ```

// Test and tool code: an unwrap that fails is the test failing, with its message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[allow(dead_code)] // the integration tests use the rest of the hub
#[path = "../tests/support/hub.rs"]
mod hub;

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [folder, repo] = args.as_slice() else {
        eprintln!("usage: dev_hub FOLDER OWNER/NAME");
        std::process::exit(2);
    };
    let hub = hub::TestHub::start_on("127.0.0.1:8788").await;
    hub.publish_folder(repo, std::path::Path::new(folder));
    println!("dev hub serving {folder} as {repo} at {}", hub.endpoint());
    println!(
        "  HF_ENDPOINT={} studio-worker models pull …",
        hub.endpoint()
    );
    if tokio::signal::ctrl_c().await.is_err() {
        std::future::pending::<()>().await;
    }
}
