//! Splitting a byte stream into top-level JSON texts, without parsing them.
//!
//! The framer only tracks what it needs to find where a text ends: nesting depth
//! of `{`/`[` versus `}`/`]`, and whether it is inside a string (and after a
//! backslash there). Whether the text is valid JSON is decided afterwards by
//! `serde_json`, so a malformed message costs one error reply and nothing else.
//!
//! Rules, applied byte by byte:
//!
//! * Between texts, JSON whitespace is skipped.
//! * `{` or `[` starts a composite text, which ends at the bracket that brings the
//!   depth back to zero (brackets inside strings do not count; mismatched kinds are
//!   left for the parser to reject).
//! * `"` starts a string text, which ends at its closing quote.
//! * Anything else starts a bare token (`42`, `true`, garbage), which ends before
//!   the next whitespace, `{`, `[` or `"`.
//! * An ASCII control character other than tab, CR and LF is never valid JSON,
//!   inside a string or out: it discards the partial text and is reported, so a
//!   client can always force the framer back into a known-good state (QEMU behaves
//!   the same way).
//! * A text longer than the limit is reported once and the framer stops: nothing
//!   beyond `limit` bytes (plus the chunk being fed) is ever buffered.

use std::collections::VecDeque;

/// One unit of input found by [`Framer::feed`].
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Frame {
    /// One complete top-level JSON text, not validated yet.
    Text(Vec<u8>),
    /// A control character; the partial text before it was discarded.
    ControlChar(u8),
    /// A text exceeded the limit. The framer accepts no further input.
    TooLarge,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Between texts.
    Idle,
    /// Inside an object or array; `depth` counts open brackets.
    Composite,
    /// Inside a top-level string (`in_string` is set) or bare token.
    Scalar,
}

/// Incremental splitter; see the module documentation for the rules.
#[derive(Debug)]
pub(crate) struct Framer {
    limit: usize,
    /// The part of the current text that came with earlier chunks.
    partial: Vec<u8>,
    state: State,
    depth: usize,
    in_string: bool,
    escaped: bool,
    overflowed: bool,
}

fn is_json_whitespace(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\r' | b'\n')
}

fn is_control(b: u8) -> bool {
    b < 0x20 && !is_json_whitespace(b)
}

impl Framer {
    /// A framer that accepts texts of at most `limit` bytes.
    pub(crate) fn new(limit: usize) -> Self {
        Framer {
            limit,
            partial: Vec::new(),
            state: State::Idle,
            depth: 0,
            in_string: false,
            escaped: false,
            overflowed: false,
        }
    }

    /// Consumes `data`, appending what it completes to `out` in input order.
    ///
    /// After [`Frame::TooLarge`] every call appends another `TooLarge` and
    /// consumes nothing.
    pub(crate) fn feed(&mut self, data: &[u8], out: &mut VecDeque<Frame>) {
        if self.overflowed {
            out.push_back(Frame::TooLarge);
            return;
        }
        // `data[start..]` belongs to the current text when one is in progress.
        let mut start = 0;
        let mut i = 0;
        while i < data.len() {
            let b = data[i];
            if is_control(b) {
                self.reset();
                out.push_back(Frame::ControlChar(b));
                i += 1;
                start = i;
                continue;
            }
            match self.state {
                State::Idle => {
                    start = i;
                    match b {
                        b if is_json_whitespace(b) => {}
                        b'{' | b'[' => {
                            self.state = State::Composite;
                            self.depth = 1;
                        }
                        b'"' => {
                            self.state = State::Scalar;
                            self.in_string = true;
                        }
                        _ => self.state = State::Scalar,
                    }
                }
                State::Composite => {
                    if self.in_string {
                        self.string_byte(b);
                    } else {
                        match b {
                            b'"' => self.in_string = true,
                            b'{' | b'[' => self.depth += 1,
                            b'}' | b']' => {
                                self.depth -= 1;
                                if self.depth == 0 {
                                    self.finish(&data[start..=i], out);
                                }
                            }
                            _ => {}
                        }
                    }
                }
                State::Scalar => {
                    if self.in_string {
                        self.string_byte(b);
                        if !self.in_string {
                            self.finish(&data[start..=i], out);
                        }
                    } else if is_json_whitespace(b) || matches!(b, b'{' | b'[' | b'"') {
                        self.finish(&data[start..i], out);
                        if self.overflowed {
                            return;
                        }
                        // The delimiter may start the next text: look at it again.
                        continue;
                    }
                }
            }
            if self.overflowed {
                return;
            }
            if self.state != State::Idle && self.partial.len() + (i + 1 - start) > self.limit {
                self.overflow(out);
                return;
            }
            i += 1;
        }
        if self.state != State::Idle {
            self.partial.extend_from_slice(&data[start..]);
        }
    }

    fn string_byte(&mut self, b: u8) {
        if self.escaped {
            self.escaped = false;
        } else if b == b'\\' {
            self.escaped = true;
        } else if b == b'"' {
            self.in_string = false;
        }
    }

    /// Ends the current text with `tail`, its part from the current chunk.
    fn finish(&mut self, tail: &[u8], out: &mut VecDeque<Frame>) {
        if self.partial.len() + tail.len() > self.limit {
            self.overflow(out);
            return;
        }
        let mut text = std::mem::take(&mut self.partial);
        text.extend_from_slice(tail);
        self.reset();
        out.push_back(Frame::Text(text));
    }

    fn overflow(&mut self, out: &mut VecDeque<Frame>) {
        self.reset();
        self.partial = Vec::new();
        self.overflowed = true;
        out.push_back(Frame::TooLarge);
    }

    fn reset(&mut self) {
        self.partial.clear();
        self.state = State::Idle;
        self.depth = 0;
        self.in_string = false;
        self.escaped = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(limit: usize, chunks: &[&[u8]]) -> Vec<Frame> {
        let mut framer = Framer::new(limit);
        let mut out = VecDeque::new();
        for chunk in chunks {
            framer.feed(chunk, &mut out);
        }
        out.into()
    }

    fn text(s: &str) -> Frame {
        Frame::Text(s.as_bytes().to_vec())
    }

    #[test]
    fn splits_objects_and_skips_whitespace() {
        let frames = split(100, &[b" {\"a\": 1}\r\n{\"b\": [1, {\"c\": 2}]}\n\t{}"]);
        assert_eq!(
            frames,
            [
                text("{\"a\": 1}"),
                text("{\"b\": [1, {\"c\": 2}]}"),
                text("{}")
            ]
        );
    }

    #[test]
    fn brackets_and_quotes_inside_strings_do_not_count() {
        let frames = split(100, &[br#"{"a": "}{][\"\\"} {"b": "\\"}"#]);
        assert_eq!(
            frames,
            [text(r#"{"a": "}{][\"\\"}"#), text(r#"{"b": "\\"}"#)]
        );
    }

    #[test]
    fn every_split_point_gives_the_same_texts() {
        let input: &[u8] = br#"{"execute": "x", "arguments": {"s": "a\"}b"}} [1,2] 42 "s" {}"#;
        let whole = split(1000, &[input]);
        assert_eq!(whole.len(), 5);
        for cut in 0..input.len() {
            assert_eq!(
                split(1000, &[&input[..cut], &input[cut..]]),
                whole,
                "cut {cut}"
            );
        }
        let bytes: Vec<&[u8]> = input.chunks(1).collect();
        assert_eq!(split(1000, &bytes), whole);
    }

    #[test]
    fn scalars_are_delimited() {
        let frames = split(100, &[b"42 true\n\"x y\"{} abc[1]\"q\""]);
        assert_eq!(
            frames,
            [
                text("42"),
                text("true"),
                text("\"x y\""),
                text("{}"),
                text("abc"),
                text("[1]"),
                text("\"q\"")
            ]
        );
    }

    #[test]
    fn control_character_resynchronises() {
        let frames = split(100, &[b"{\"execute\": \"x", b"\x1b\n{\"a\": 1}"]);
        assert_eq!(frames, [Frame::ControlChar(0x1b), text("{\"a\": 1}")]);
    }

    #[test]
    fn oversize_text_is_reported_once_then_input_is_refused() {
        let mut framer = Framer::new(8);
        let mut out = VecDeque::new();
        framer.feed(b"{\"a\":1} {\"abcdefgh\":", &mut out);
        assert_eq!(out, [text("{\"a\":1}"), Frame::TooLarge]);
        out.clear();
        framer.feed(b"{}", &mut out);
        assert_eq!(out, [Frame::TooLarge]);
    }

    #[test]
    fn oversize_across_chunks_and_exact_limit() {
        assert_eq!(split(4, &[b"[1,", b"2]"]), [Frame::TooLarge]);
        assert_eq!(split(5, &[b"[1,", b"2]"]), [text("[1,2]")]);
        assert_eq!(split(3, &[b"1234 "]), [Frame::TooLarge]);
        assert_eq!(split(4, &[b"1234 "]), [text("1234")]);
    }

    #[test]
    fn unbalanced_closers_are_bare_tokens() {
        assert_eq!(split(100, &[b"} {}"]), [text("}"), text("{}")]);
    }
}
