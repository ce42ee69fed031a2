from flowcopy.cli import main

main()
