from fusedformer.cli import main

raise SystemExit(main())
