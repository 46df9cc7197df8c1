//! Delta packages (SPEC §2, issue 14): what pack ships, and installs that keep every guarantee.
