//! Command-line handling shared by the binaries: bad flags give one line.

use clap::error::ErrorKind;
use clap::Parser;

/// Parses the process arguments; on bad flags prints `NAME: error: ... (see --help)`
/// and exits with status 2 (help and version print as usual).
pub fn parse<T: Parser>(name: &str) -> T {
    T::try_parse().unwrap_or_else(|error| {
        if matches!(error.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
            error.exit();
        }
        eprintln!("{name}: error: {} (see --help)", one_line(&error.render().to_string()));
        std::process::exit(2);
    })
}

/// Ends a binary's fallible body: an error prints `NAME: error: ...` (with its
/// causes, for errors whose alternate form lists them) and exits with status 1.
pub fn exit_on_error<E: std::fmt::Display>(name: &str, result: Result<(), E>) {
    if let Err(e) = result {
        eprintln!("{name}: error: {e:#}");
        std::process::exit(1);
    }
}

/// clap's first paragraph, without its `error:` prefix, on one line.
fn one_line(rendered: &str) -> String {
    let first = rendered.split("\n\n").next().unwrap_or_default();
    first.trim_start_matches("error: ").split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Parser)]
    struct Args {
        #[arg(long)]
        port: u16,
    }

    #[test]
    fn bad_flags_render_as_one_line() {
        let err = Args::try_parse_from(["x", "--port", "nope"]).unwrap_err();
        let line = one_line(&err.render().to_string());
        assert!(!line.contains('\n'), "{line}");
        assert!(line.starts_with("invalid value 'nope' for '--port <PORT>'"), "{line}");
    }
}
