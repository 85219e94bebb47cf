from melanoma.cli import main

main()
