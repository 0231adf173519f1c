"""First-party modelc plugins; each subpackage registers through the compiler_core entry-point group."""
