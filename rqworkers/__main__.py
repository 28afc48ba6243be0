from rqworkers.cli import main

raise SystemExit(main())
