//! The image engine against the reference (diffusers), on the tiny fixtures in
//! `tests/fixtures/models/` (made by `tests/fixtures/make_fixtures.py`).

mod generate;
mod parity;
mod support;
