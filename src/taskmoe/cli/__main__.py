from taskmoe.cli import main

main()
