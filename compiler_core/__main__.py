from compiler_core.cli import main

main()
