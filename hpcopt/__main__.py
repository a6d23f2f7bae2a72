from hpcopt.cli import main

raise SystemExit(main())
