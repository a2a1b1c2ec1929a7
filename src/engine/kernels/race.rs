//! Our kernels timed against what they replace, on the person's own GPU, once per process
//! while it is prepared: a kernel that is correct (its check passed) but slower there than
//! candle's composition (or, for the register attention, than our WMMA kernel) stays off, so
//! no card runs a job slower for a kernel of ours. The 3×3 convolution is raced at each model
//! part's shapes and judged per part ([`PartVerdict`]). This is what `cudnn.benchmark` does for
//! PyTorch's convolutions: the card decides, not a table measured on another card. The
//! races themselves, at a job's shapes, are in `cuda/race.rs`; this module holds how a race
//! is run and judged, which the tests check on the CPU with a clock of their own.

use std::time::Duration;

use candle_core::Result;

/// Rounds per side, alternating which side goes first; each side's fastest round counts (a
/// round that met a clock change or another program's work on the GPU is slower, never
/// faster).
const ROUNDS: usize = 3;
/// Calls per round: a round's time is their total, so one launch's jitter is spread.
const CALLS: u32 = 4;
/// How much slower than the other side ours may be and still run: within it, the two are
/// the same speed as far as a few rounds can tell, and ours also holds less memory (the
/// estimate of a job's working memory assumes ours where it loaded). Past it, ours goes.
const SLOWER_ALLOWED: f64 = 1.1;

/// What a race measured: the time of one call of each side.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timing {
    pub ours: Duration,
    pub theirs: Duration,
}

impl Timing {
    /// Whether ours keeps running: not slower than the other side beyond [`SLOWER_ALLOWED`].
    pub fn ours_runs(self) -> bool {
        self.ours.as_secs_f64() <= self.theirs.as_secs_f64() * SLOWER_ALLOWED
    }

    /// Ours as a multiple of theirs (below 1: ours is faster).
    pub fn ratio(self) -> f64 {
        self.ours.as_secs_f64() / self.theirs.as_secs_f64().max(f64::MIN_POSITIVE)
    }

    /// Times `ours` against `theirs`. Each is called once untimed first (what loads on first
    /// use does so then), then [`ROUNDS`] rounds of [`CALLS`] calls per side, alternating
    /// which side starts; `finish` waits for the device to finish what was launched (a GPU's
    /// calls return before their work is done) and `clock` reads the time. The first error of
    /// any call is the race's.
    pub fn measure(
        clock: &dyn Fn() -> Duration,
        finish: &dyn Fn() -> Result<()>,
        ours: &dyn Fn() -> Result<()>,
        theirs: &dyn Fn() -> Result<()>,
    ) -> Result<Timing> {
        let sides = [ours, theirs];
        for side in sides {
            side()?;
        }
        finish()?;
        let mut fastest = [Duration::MAX; 2];
        for round in 0..ROUNDS {
            let order = if round % 2 == 0 { [0, 1] } else { [1, 0] };
            for index in order {
                let started = clock();
                for _ in 0..CALLS {
                    sides[index]()?;
                }
                finish()?;
                let per_call = clock().saturating_sub(started) / CALLS;
                fastest[index] = fastest[index].min(per_call);
            }
        }
        Ok(Timing {
            ours: fastest[0],
            theirs: fastest[1],
        })
    }
}

/// What a race run at each part's shapes decides (the 3×3 convolution's: the UNet's and the
/// VAE decoder's shapes are GEMMs of other kinds, and a card may favour our kernel for one
/// only).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PartVerdict<P> {
    /// Ours runs for every part.
    Runs,
    /// Ours stays off for these parts, and runs for the others.
    OffFor(Vec<P>),
    /// Ours lost at every part: off whole, as a kernel that lost its one race.
    Off,
}

impl<P: Copy> PartVerdict<P> {
    /// The verdict of `timings`, one per part raced: ours is off for each part where it is
    /// slower beyond [`SLOWER_ALLOWED`].
    pub fn of(timings: &[(P, Timing)]) -> Self {
        let lost: Vec<P> = timings
            .iter()
            .filter(|(_, timing)| !timing.ours_runs())
            .map(|&(part, _)| part)
            .collect();
        if lost.is_empty() {
            Self::Runs
        } else if lost.len() == timings.len() {
            Self::Off
        } else {
            Self::OffFor(lost)
        }
    }
}

#[cfg(test)]
mod tests {
    use std::cell::{Cell, RefCell};

    use super::*;

    const MS: Duration = Duration::from_millis(1);

    /// A clock that moves only when a side says it spent time, and the sides' calls in order.
    #[derive(Default)]
    struct Track {
        now: Cell<Duration>,
        calls: RefCell<Vec<&'static str>>,
    }

    impl Track {
        fn spend(&self, side: &'static str, time: Duration) -> Result<()> {
            self.now.set(self.now.get() + time);
            self.calls.borrow_mut().push(side);
            Ok(())
        }

        /// Which call of `side` the one being made is, from 1.
        fn call_number(&self, side: &str) -> usize {
            self.calls
                .borrow()
                .iter()
                .filter(|made| **made == side)
                .count()
                + 1
        }
    }

    #[test]
    fn a_race_times_one_call_of_each_side_after_an_untimed_first() {
        let track = Track::default();
        // Ours compiles on its first call (a second), then takes 1 ms; theirs 3 ms.
        let ours = || {
            let time = if track.call_number("ours") == 1 {
                1000 * MS
            } else {
                MS
            };
            track.spend("ours", time)
        };
        let theirs = || track.spend("theirs", 3 * MS);
        let finished = Cell::new(0);
        let finish = || {
            finished.set(finished.get() + 1);
            Ok(())
        };
        let timing = Timing::measure(&|| track.now.get(), &finish, &ours, &theirs).unwrap();
        assert_eq!(
            timing,
            Timing {
                ours: MS,
                theirs: 3 * MS
            }
        );
        assert!(timing.ours_runs());
        assert!((timing.ratio() - 1.0 / 3.0).abs() < 1e-9);
        // Each side once, then rounds that alternate which side starts.
        let calls = track.calls.borrow();
        assert_eq!(calls.len(), 2 + 2 * ROUNDS * CALLS as usize);
        let first_of_round = |round: usize| calls[2 + round * 2 * CALLS as usize];
        assert_eq!(
            (first_of_round(0), first_of_round(1), first_of_round(2)),
            ("ours", "theirs", "ours")
        );
        // The device was waited for after the untimed calls and after every side's round.
        assert_eq!(finished.get(), 1 + 2 * ROUNDS);
    }

    #[test]
    fn a_round_slowed_by_something_else_does_not_count() {
        let track = Track::default();
        // Theirs meets another program's work on one call of its first round.
        let theirs = || {
            let time = if track.call_number("theirs") == 3 {
                50 * MS
            } else {
                2 * MS
            };
            track.spend("theirs", time)
        };
        let ours = || track.spend("ours", 4 * MS);
        let timing = Timing::measure(&|| track.now.get(), &|| Ok(()), &ours, &theirs).unwrap();
        assert_eq!(timing.theirs, 2 * MS);
        assert_eq!(timing.ours, 4 * MS);
        assert!(!timing.ours_runs());
    }

    #[test]
    fn ours_runs_unless_it_is_clearly_slower() {
        let timing = |ours: u64, theirs: u64| Timing {
            ours: Duration::from_micros(ours),
            theirs: Duration::from_micros(theirs),
        };
        assert!(timing(500, 1000).ours_runs());
        assert!(timing(1000, 1000).ours_runs());
        // Within a tenth: the same speed, as far as the race can tell.
        assert!(timing(1090, 1000).ours_runs());
        assert!(!timing(1150, 1000).ours_runs());
        assert!(!timing(3000, 1000).ours_runs());
        // A side too fast for the clock does not divide by zero.
        assert!(timing(0, 0).ours_runs());
        assert!(timing(1, 0).ratio().is_finite());
    }

    #[test]
    fn a_race_at_each_parts_shapes_turns_ours_off_where_it_lost_and_whole_where_it_lost_all() {
        let timing = |ours: u64, theirs: u64| Timing {
            ours: Duration::from_micros(ours),
            theirs: Duration::from_micros(theirs),
        };
        assert_eq!(
            PartVerdict::of(&[("unet", timing(900, 1000)), ("decoder", timing(400, 1000))]),
            PartVerdict::Runs
        );
        // Slower at the UNet's shapes only (within a tenth is not slower).
        assert_eq!(
            PartVerdict::of(&[
                ("unet", timing(1200, 1000)),
                ("decoder", timing(1090, 1000))
            ]),
            PartVerdict::OffFor(vec!["unet"])
        );
        assert_eq!(
            PartVerdict::of(&[("unet", timing(900, 1000)), ("decoder", timing(3000, 1000))]),
            PartVerdict::OffFor(vec!["decoder"])
        );
        assert_eq!(
            PartVerdict::of(&[
                ("unet", timing(1200, 1000)),
                ("decoder", timing(3000, 1000))
            ]),
            PartVerdict::Off
        );
        // One part raced: its verdict is the kernel's.
        assert_eq!(
            PartVerdict::of(&[("decoder", timing(3000, 1000))]),
            PartVerdict::Off
        );
    }

    #[test]
    fn a_failing_call_fails_the_race() {
        let track = Track::default();
        let theirs = || {
            if track.call_number("theirs") == 2 {
                candle_core::bail!("out of memory");
            }
            track.spend("theirs", MS)
        };
        let ours = || track.spend("ours", MS);
        let error = Timing::measure(&|| track.now.get(), &|| Ok(()), &ours, &theirs).unwrap_err();
        assert!(error.to_string().contains("out of memory"), "{error}");
    }
}
