//! The report as text: the end-of-run summary (`text`), the refreshing
//! view while running (`live`), and the one-line summary of what is not
//! watched (`unwatched`). Reads the report; nothing else reads this.

mod live;
mod text;
mod unwatched;

pub use live::live;
pub use text::{render, render_with};

/// How to print a report on a terminal.
#[derive(Clone, Copy, Debug, Default)]
pub struct Style {
    /// ANSI colours for finding kinds and gaps.
    pub color: bool,
    /// Only the diagnosis (`--quiet`).
    pub findings_only: bool,
}
