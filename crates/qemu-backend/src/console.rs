//! The guest's serial console as QEMU hands it over on stdout, and QEMU's own stderr.
//!
//! Both are guest- or QEMU-controlled byte streams, so nothing here trusts them: bytes that are
//! not UTF-8 are decoded lossily (the raw bytes still go to `serial.log`), a line is held in
//! memory only up to [`MAX_LINE`] bytes, only the first and last lines of a long console are
//! held (the full console is in `serial.log`), and only the end of stderr is kept. Reading
//! never stops before the pipe closes, so QEMU can never block on a full pipe.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::sync::mpsc::SyncSender;
use std::time::{Duration, Instant};

use crate::launcher::ConsoleSink;

/// Longest console line held in memory and handed to the sink. A longer line reaches
/// `serial.log` whole; in memory it is cut here and counted in [`ConsoleSummary::long_lines`].
pub const MAX_LINE: usize = 4096;
/// Lines kept from the start of the console (boot, `/init` starting).
pub const HEAD_LINES: usize = 2000;
/// Lines kept from the end of the console (results, panics, the last words before a hang).
pub const TAIL_LINES: usize = 8000;
/// Bytes of console text held in memory at most (head and tail together).
pub const MAX_HELD_BYTES: usize = 8 << 20;
/// How much of the end of QEMU's stderr is kept.
pub const STDERR_KEEP: usize = 64 << 10;

/// The phrase `/init` prints first (the boot-to-`/init` time and "did the guest get anywhere");
/// the same marker for every backend.
pub use sluice_host::supervisor::INIT_STARTED;
use sluice_host::supervisor::{is_init_line, is_panic_line};

/// What the reader thread hands the supervisor.
pub(crate) enum Console {
    /// A piece of one line: at most [`MAX_LINE`] raw bytes without the newline.
    Piece {
        raw: Vec<u8>,
        /// The decoded text, for the first piece of a line only (continuations are not held).
        text: Option<String>,
        at: Duration,
        /// The line goes on in the next piece (it was longer than [`MAX_LINE`]).
        continues: bool,
    },
    /// The pipe closed.
    End,
}

/// Reads QEMU's stdout until it closes, in pieces of at most [`MAX_LINE`] bytes per line, and
/// calls `sink` with the (lossily decoded) first piece of every line as it arrives.
pub(crate) fn read_console(
    out: impl Read,
    tx: &SyncSender<Console>,
    sink: Option<&ConsoleSink>,
    start: Instant,
) {
    let mut reader = BufReader::with_capacity(64 << 10, out);
    let mut piece: Vec<u8> = Vec::new();
    // The piece being gathered continues a line already cut at MAX_LINE.
    let mut continuation = false;
    let send = |piece: &mut Vec<u8>, continues: bool, continuation: bool| {
        if !continues && piece.last() == Some(&b'\r') {
            // Serial consoles end lines with CRLF; the text is the same without the CR.
            piece.pop();
        }
        let text = (!continuation).then(|| String::from_utf8_lossy(piece).into_owned());
        if let (Some(ConsoleSink(f)), Some(t)) = (sink, &text) {
            f(t);
        }
        let _ = tx.send(Console::Piece {
            raw: std::mem::take(piece),
            text,
            at: start.elapsed(),
            continues,
        });
    };
    loop {
        let buf = match reader.fill_buf() {
            Ok(b) => b,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(_) => break,
        };
        if buf.is_empty() {
            break;
        }
        let room = MAX_LINE.saturating_sub(piece.len());
        let window = buf.get(..room.min(buf.len())).unwrap_or(buf);
        let (used, complete) = match window.iter().position(|&b| b == b'\n') {
            Some(i) => {
                piece.extend_from_slice(window.get(..i).unwrap_or_default());
                (i + 1, true)
            }
            None => {
                piece.extend_from_slice(window);
                (window.len(), false)
            }
        };
        reader.consume(used);
        if complete || piece.len() >= MAX_LINE {
            send(&mut piece, !complete, continuation);
            continuation = !complete;
        }
    }
    if !piece.is_empty() {
        send(&mut piece, false, continuation);
    }
    let _ = tx.send(Console::End);
}

/// Reads QEMU's stderr until it closes and returns its end (at most [`STDERR_KEEP`] bytes),
/// lossily decoded.
pub(crate) fn read_stderr_tail(mut err: impl Read) -> String {
    let mut kept: Vec<u8> = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        match err.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => {
                kept.extend_from_slice(chunk.get(..n).unwrap_or_default());
                // Drop the front in batches, not on every read.
                if kept.len() > 2 * STDERR_KEEP {
                    kept.drain(..kept.len() - STDERR_KEEP);
                }
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    if kept.len() > STDERR_KEEP {
        kept.drain(..kept.len() - STDERR_KEEP);
    }
    String::from_utf8_lossy(&kept).into_owned()
}

/// How much of the console the run kept in memory; the report says when something was cut.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ConsoleSummary {
    /// Lines the guest printed.
    pub lines: u64,
    /// Lines left out of the in-memory console (between its head and its tail).
    pub dropped_lines: u64,
    /// Lines longer than [`MAX_LINE`] bytes, cut in memory.
    pub long_lines: u64,
    /// Lines with bytes that are not UTF-8 (decoded with U+FFFD in memory, raw in the log).
    pub non_utf8_lines: u64,
    /// QEMU exited but its console pipe did not reach its end within the drain time (another
    /// process still holds it open, or the reader stopped): what followed is missing.
    pub unfinished: bool,
}

impl ConsoleSummary {
    /// Something of the console is only in `serial.log`.
    pub fn truncated(&self) -> bool {
        self.dropped_lines > 0 || self.long_lines > 0 || self.unfinished
    }
}

/// What the supervisor has read of the console so far.
#[derive(Default)]
pub(crate) struct ConsoleState {
    head: Vec<String>,
    tail: VecDeque<String>,
    held_bytes: usize,
    /// The log's last piece continues a line.
    mid_line: bool,
    pub(crate) summary: ConsoleSummary,
    pub(crate) init_at: Option<Duration>,
    pub(crate) panicked: bool,
    pub(crate) ended: bool,
}

impl ConsoleState {
    /// Logs one message (raw bytes, host-timestamped per line) and holds its text if it fits.
    pub(crate) fn take(&mut self, msg: Console, log: &mut File) {
        let Console::Piece {
            raw,
            text,
            at,
            continues,
        } = msg
        else {
            self.ended = true;
            return;
        };
        // A serial log that cannot be written is not a reason to stop reading the guest.
        if !self.mid_line {
            let _ = write!(log, "[{:9.3}] ", at.as_secs_f64());
        }
        let _ = log.write_all(&raw);
        if !continues {
            let _ = log.write_all(b"\n");
        }
        let first_piece = !self.mid_line;
        self.mid_line = continues;
        let Some(line) = text.filter(|_| first_piece) else {
            return;
        };
        self.summary.lines += 1;
        if continues {
            self.summary.long_lines += 1;
        }
        if std::str::from_utf8(&raw).is_err() {
            self.summary.non_utf8_lines += 1;
        }
        if self.init_at.is_none() && is_init_line(&line) {
            self.init_at = Some(at);
        }
        self.panicked |= is_panic_line(&line);
        self.hold(line);
    }

    fn hold(&mut self, line: String) {
        // The head gets at most a quarter of the byte budget so a long console always keeps
        // its end, where the results are.
        if self.head.len() < HEAD_LINES && self.held_bytes + line.len() <= MAX_HELD_BYTES / 4 {
            self.held_bytes += line.len();
            self.head.push(line);
            return;
        }
        self.held_bytes += line.len();
        self.tail.push_back(line);
        while self.tail.len() > TAIL_LINES || self.held_bytes > MAX_HELD_BYTES {
            let Some(old) = self.tail.pop_front() else {
                break;
            };
            self.held_bytes -= old.len();
            self.summary.dropped_lines += 1;
        }
    }

    /// The lines held, in order, with one note where lines were left out.
    pub(crate) fn into_lines(self) -> (Vec<String>, ConsoleSummary) {
        let mut lines = self.head;
        if self.summary.dropped_lines > 0 {
            lines.push(format!(
                "[sluice: {} console lines not kept in memory; the full console is in the serial log]",
                self.summary.dropped_lines
            ));
        }
        lines.extend(self.tail);
        (lines, self.summary)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex, mpsc};

    fn read_all(input: &[u8]) -> (Vec<String>, ConsoleSummary, Vec<u8>, Vec<String>) {
        // A small queue: the reader waits for the supervisor, it never drops.
        let (tx, rx) = mpsc::sync_channel(16);
        let seen = Arc::new(Mutex::new(Vec::new()));
        let sink = {
            let seen = seen.clone();
            ConsoleSink(Arc::new(move |l: &str| {
                seen.lock().unwrap().push(l.to_string())
            }))
        };
        let input = input.to_vec();
        let reader =
            std::thread::spawn(move || read_console(&input[..], &tx, Some(&sink), Instant::now()));
        let dir = std::env::temp_dir().join(format!("sluice-console-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = dir.join(format!("{n}.log"));
        let mut log = File::create(&path).unwrap();
        let mut state = ConsoleState::default();
        for m in rx.iter() {
            state.take(m, &mut log);
        }
        reader.join().unwrap();
        assert!(state.ended);
        drop(log);
        let logged = std::fs::read(&path).unwrap();
        let _ = std::fs::remove_file(&path);
        let (lines, summary) = state.into_lines();
        let sunk = seen.lock().unwrap().clone();
        (lines, summary, logged, sunk)
    }

    /// The log without its `[   t.ttt] ` timestamps.
    fn untimed(log: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        for line in log.split_inclusive(|&b| b == b'\n') {
            out.extend_from_slice(line.get(12..).unwrap_or_default());
        }
        out
    }

    #[test]
    fn invalid_utf8_is_decoded_lossily_and_reading_goes_on() {
        let (lines, summary, log, sunk) = read_all(b"one\r\n\xff\xfe bad \xc3\n" as &[u8]);
        let (lines2, ..) = read_all(b"one\r\n\xff\xfe bad \xc3\nthree\npartial");
        assert_eq!(lines, ["one", "\u{fffd}\u{fffd} bad \u{fffd}"]);
        assert_eq!(summary.non_utf8_lines, 1);
        assert_eq!(sunk, lines, "the sink sees every line as it comes");
        assert_eq!(
            untimed(&log),
            b"one\n\xff\xfe bad \xc3\n",
            "raw bytes in the log"
        );
        assert_eq!(lines2.last().map(String::as_str), Some("partial"));
        assert_eq!(lines2.len(), 4);
    }

    #[test]
    fn long_lines_are_cut_in_memory_but_whole_in_the_log() {
        let mut input = vec![b'x'; 3 * MAX_LINE + 10];
        input.extend_from_slice(b"\nSLUICE: init started\n");
        let (lines, summary, log, sunk) = read_all(&input);
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0].len(), MAX_LINE);
        assert_eq!(lines[1], INIT_STARTED);
        assert_eq!(sunk.len(), 2, "one sink call per line, not per piece");
        assert_eq!(summary.long_lines, 1);
        assert!(summary.truncated());
        assert_eq!(untimed(&log), input, "the log has the whole line");
    }

    #[test]
    fn a_long_console_keeps_its_head_and_tail_within_the_budget() {
        let n = HEAD_LINES + TAIL_LINES + 500;
        let mut input = Vec::new();
        for i in 0..n {
            input.extend_from_slice(format!("line {i}\n").as_bytes());
        }
        let (lines, summary, log, _) = read_all(&input);
        assert_eq!(summary.lines, n as u64);
        assert_eq!(summary.dropped_lines, 500);
        assert_eq!(lines.len(), HEAD_LINES + 1 + TAIL_LINES);
        assert_eq!(lines[0], "line 0");
        assert!(lines[HEAD_LINES].contains("500 console lines not kept"));
        assert_eq!(lines.last().unwrap(), &format!("line {}", n - 1));
        assert_eq!(untimed(&log), input);
        // The byte budget holds too, with lines at the length cap.
        let big = vec![b'y'; MAX_LINE];
        let mut state = ConsoleState::default();
        for _ in 0..(2 * MAX_HELD_BYTES / MAX_LINE) {
            state.hold(String::from_utf8(big.clone()).unwrap());
        }
        assert!(state.held_bytes <= MAX_HELD_BYTES);
        assert!(state.summary.dropped_lines > 0);
    }

    #[test]
    fn stderr_keeps_only_its_end() {
        let mut input = vec![b'a'; 3 * STDERR_KEEP];
        input.extend_from_slice(b"\xffthe end");
        let s = read_stderr_tail(&input[..]);
        assert!(s.ends_with("\u{fffd}the end"));
        assert!(s.len() <= STDERR_KEEP + 2);
    }
}
