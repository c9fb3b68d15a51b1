//! Engine logs (`tracing`) delivered to Python's `logging`, under the `ferroxy` loggers.
//!
//! Events are formatted on the thread that emits them, queued, and emitted by the Python
//! thread in batches. Python decides the level: it tells us the `ferroxy` logger's effective
//! level, and events below it are dropped before any formatting.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
use std::sync::{Arc, Weak};

use parking_lot::Mutex;
use tracing::field::{Field, Visit};
use tracing::{Event, Level, Metadata, Subscriber};
use tracing_subscriber::layer::{Context, Layer};
use tracing_subscriber::prelude::*;

use crate::bridge::Bridge;

/// Python's WARNING until Python says otherwise.
static THRESHOLD: AtomicI32 = AtomicI32::new(30);
static RECORDS: Mutex<Vec<Record>> = Mutex::new(Vec::new());
/// Bridges whose Python loop can emit queued records.
static LOOPS: Mutex<Vec<Weak<Bridge>>> = Mutex::new(Vec::new());
/// Set once a loop has been woken for the queued records; cleared when they are taken.
static WAKE_PENDING: AtomicBool = AtomicBool::new(false);
/// Past this many unread records, new ones are dropped (and counted) rather than grow
/// without bound.
const MAX_QUEUED: usize = 100_000;
/// Records dropped since the last batch was taken; reported in the next batch.
static DROPPED: AtomicU64 = AtomicU64::new(0);

pub struct Record {
    pub logger: &'static str,
    pub level: i32,
    pub message: String,
}

pub fn install() {
    let _ = tracing::subscriber::set_global_default(
        tracing_subscriber::registry().with(PythonLogLayer),
    );
}

pub fn set_threshold(level: i32) {
    THRESHOLD.store(level, Ordering::Relaxed);
}

pub fn register_loop(bridge: &Arc<Bridge>) {
    let mut loops = LOOPS.lock();
    loops.retain(|b| b.strong_count() > 0);
    loops.push(Arc::downgrade(bridge));
}

pub fn take_records() -> Vec<Record> {
    WAKE_PENDING.store(false, Ordering::Release);
    let mut records = std::mem::take(&mut *RECORDS.lock());
    let dropped = DROPPED.swap(0, Ordering::Relaxed);
    if dropped > 0 {
        records.push(Record {
            logger: "ferroxy",
            level: python_level(&Level::WARN),
            message: format!("{dropped} engine log records were dropped: Python fell behind"),
        });
    }
    records
}

/// Wake the serving loops to emit queued records, once per batch; the first to run takes
/// them all. Every serving loop is woken, not one: a loop that stopped without saying so
/// must not strand the records. When no loop serves yet, the flag stays clear so the next
/// record (or a loop starting) tries again.
pub fn wake_loops() {
    if WAKE_PENDING.swap(true, Ordering::AcqRel) {
        return;
    }
    let mut woke = false;
    for bridge in LOOPS
        .lock()
        .iter()
        .filter_map(Weak::upgrade)
        .filter(|b| b.is_serving())
    {
        bridge.wake();
        woke = true;
    }
    if !woke {
        WAKE_PENDING.store(false, Ordering::Release);
    }
}

fn python_level(level: &Level) -> i32 {
    match *level {
        Level::ERROR => 40,
        Level::WARN => 30,
        Level::INFO => 20,
        Level::DEBUG => 10,
        Level::TRACE => 5,
    }
}

/// Engine targets are Rust module paths; users see the `ferroxy` logger, or a named child
/// such as `ferroxy.pool` when the event names one as its target.
fn logger_name(target: &'static str) -> &'static str {
    if target.starts_with("ferroxy.") {
        target
    } else {
        "ferroxy"
    }
}

struct PythonLogLayer;

impl<S: Subscriber> Layer<S> for PythonLogLayer {
    fn register_callsite(&self, _: &'static Metadata<'static>) -> tracing::subscriber::Interest {
        // The level can change at run time, so never let tracing cache a verdict.
        tracing::subscriber::Interest::sometimes()
    }

    fn enabled(&self, metadata: &Metadata<'_>, _: Context<'_, S>) -> bool {
        python_level(metadata.level()) >= THRESHOLD.load(Ordering::Relaxed)
    }

    fn on_event(&self, event: &Event<'_>, _: Context<'_, S>) {
        let metadata = event.metadata();
        let mut message = MessageVisitor(String::new());
        event.record(&mut message);
        let record = Record {
            logger: logger_name(metadata.target()),
            level: python_level(metadata.level()),
            message: message.0,
        };
        {
            let mut records = RECORDS.lock();
            if records.len() >= MAX_QUEUED {
                DROPPED.fetch_add(1, Ordering::Relaxed);
                return;
            }
            records.push(record);
        }
        wake_loops();
    }
}

/// `message` first, then the other fields as ` key=value`.
struct MessageVisitor(String);

impl Visit for MessageVisitor {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            let _ = write!(self.0, "{value:?}");
        } else {
            let _ = write!(self.0, " {}={value:?}", field.name());
        }
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.0.push_str(value);
        } else {
            let _ = write!(self.0, " {}={value}", field.name());
        }
    }
}

/// Report a Python exception through Python's logging (the `ferroxy` logger), traceback
/// included.
pub fn log_python_error(py: pyo3::Python<'_>, error: &pyo3::PyErr, what: &str) {
    use pyo3::prelude::*;
    let logged = py.import("logging").and_then(|logging| {
        let logger = logging.call_method1("getLogger", ("ferroxy",))?;
        let kwargs = pyo3::types::PyDict::new(py);
        kwargs.set_item("exc_info", error.value(py))?;
        logger.call_method("error", (what,), Some(&kwargs))
    });
    if logged.is_err() {
        error.print(py);
    }
}
