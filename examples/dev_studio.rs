//! A studio on your own machine, to see the whole registration flow without the real one.
//!
//! ```sh
//! cargo run --example dev_studio                 # listens on 127.0.0.1:8787
//! cargo run --example dev_studio -- --auto-approve
//! cargo run -- run --headless --api-url http://127.0.0.1:8787/api
//! ```
//! Then open <http://127.0.0.1:8787/operator/> to approve or reject the worker, pause it or
//! revoke it. The same operator actions are plain HTTP for scripts:
//! `curl -X POST http://127.0.0.1:8787/operator/requests/rr_0001/approve`. Jobs too:
//! `curl -d @job.json http://127.0.0.1:8787/operator/jobs` queues one (the claim's job JSON),
//! `curl http://127.0.0.1:8787/operator/jobs/JOB_ID` says where it is (`benches/gpu` uses
//! both).

// Test and tool code: an unwrap that fails is the test failing, with its message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[allow(dead_code)] // the integration tests use the rest of the studio
#[path = "../tests/support/studio.rs"]
mod studio;

use studio::{Decision, TestStudio};

#[tokio::main]
async fn main() {
    let mut addr = "127.0.0.1:8787".to_owned();
    let mut auto_approve = false;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--auto-approve" => auto_approve = true,
            "--listen" => addr = args.next().unwrap_or(addr),
            other => {
                eprintln!(
                    "usage: dev_studio [--listen 127.0.0.1:8787] [--auto-approve] (got {other:?})"
                );
                std::process::exit(2);
            }
        }
    }
    let Ok(addr) = addr.parse() else {
        eprintln!("--listen takes an address like 127.0.0.1:8787");
        std::process::exit(2);
    };
    let studio = TestStudio::start_on(addr).await;
    studio.set_poll_after_s(Some(5));
    if auto_approve {
        studio.set_decision(Decision::ApproveAfterPolls(1));
    }
    println!("dev studio listening: API {}", studio.url());
    println!("operator page:        http://{}/operator/", studio.addr());
    println!("run a worker against it:");
    println!("  cargo run -- run --headless --api-url {}", studio.url());
    if tokio::signal::ctrl_c().await.is_err() {
        std::future::pending::<()>().await;
    }
}
