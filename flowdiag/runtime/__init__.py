"""Where and how flowdiag runs: errors, file names, version, lazy exports, device, threads, processes,
ranks. The ground floor: it imports nothing else of flowdiag."""
