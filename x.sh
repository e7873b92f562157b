#!/bin/sh
# Entry point on a fresh machine: installs the pinned Rust toolchain (cargo
# will not: RUSTUP_AUTO_INSTALL=0 here), then runs `cargo xtask "$@"`.
#   ./x.sh demo   set everything up and run the built-in demo
#   ./x.sh test   set everything up and run every test
set -eu
cd "$(dirname "$0")"
command -v rustup >/dev/null || { echo "x.sh: rustup is required (https://rustup.rs)" >&2; exit 1; }
channel=$(sed -n 's/^channel *= *"\(.*\)"/\1/p' rust-toolchain.toml)
if ! rustup toolchain list | grep -q "^$channel-"; then
    rustup toolchain install --no-self-update "$channel" --profile minimal --component clippy,rustfmt
fi
exec cargo xtask "$@"
