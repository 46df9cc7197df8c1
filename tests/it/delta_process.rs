//! Delta packages installed by real processes: SIGKILL at every crash point of a delta
//! install, and the daemon installing one through the legacy /download + /update story.
