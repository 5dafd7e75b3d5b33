from diffserve.cli import main

main()
